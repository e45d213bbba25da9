"""The FID feature extractor for MNIST: a small CNN classifier trained here on the train split, whose
penultimate layer (after ReLU, like Inception's pool3) gives the features. No Inception weights ship in
any package and nothing may be downloaded, so this network stands in for InceptionV3 on MNIST.

Training is seeded and single-threaded, so the weights are a function of the config; they are cached as
safetensors under $LCSC_CACHE_DIR (default ~/.cache/lcsc-ray) by a hash of the config, written
atomically under a file lock (two evaluator actors asking at once train it once). The metadata records
the held-out test accuracy (on the 1,000 holdout digits, which it never trains on).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lcsc_ray.recipes.data import mnist_split
from rayops import settings

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "LCSC_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/lcsc-ray"
FEATURE_NET_VERSION = "1"  # bump when the architecture or training changes


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture and training of the feature classifier (all of it enters the cache key)."""

    width: int = 32  # channels of the first conv; the second has 2x
    feature_dim: int = 128  # d of the (B, d) features
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2  # random translation augmentation, pixels
    seed: int = 0


class FeatureNet(nn.Module):
    """conv-pool-conv-pool-fc(d)-fc(10); forward(images in [-1,1] (B,1,28,28)) -> features (B, d)."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        w = config.width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * 7 * 7, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, 10)
        self.dropout = nn.Dropout(0.3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(images)), 2)  # (B, w, 14, 14)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 2w, 7, 7)
        return F.relu(self.fc(h.flatten(1)))  # (B, d)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.dropout(self(images)))


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    if max_shift == 0:
        return images
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # background is -1
    return padded[:, :, max_shift + dy : max_shift + dy + 28, max_shift + dx : max_shift + dx + 28]


@torch.inference_mode()
def classifier_accuracy(net: FeatureNet, split: str = "holdout") -> float:
    """Fraction of `split` digits classified correctly."""
    images, labels = mnist_split(split)
    was_training = net.training
    net.eval()
    correct = sum(
        (net.logits(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum().item()
        for i in range(0, len(images), 500)
    )
    net.train(was_training)
    return correct / len(images)


def train_feature_network(config: FeatureNetConfig) -> tuple[FeatureNet, float]:
    """Train the classifier on the train split (one thread, seeded); returns it and its holdout accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = FeatureNet(config)
            images, labels = mnist_split("train")
            optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
            steps = config.epochs * (len(images) // config.batch_size)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
            net.train()
            for _ in range(config.epochs):
                order = torch.randperm(len(images), generator=generator)
                for start in range(0, len(images) - config.batch_size + 1, config.batch_size):
                    index = order[start : start + config.batch_size]
                    batch = _random_shift(images[index], config.max_shift, generator)
                    loss = F.cross_entropy(net.logits(batch), labels[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
        net.eval()
        return net, classifier_accuracy(net)
    finally:
        torch.set_num_threads(threads)


def cache_dir(explicit: str | None = None) -> Path:
    """The cache directory: the argument, else $LCSC_CACHE_DIR, else ~/.cache/lcsc-ray."""
    return Path(os.path.expanduser(explicit or settings.env_str(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)))


def config_hash(config: FeatureNetConfig) -> str:
    """Short sha256 of the config and FEATURE_NET_VERSION: the cache key."""
    text = json.dumps({"version": FEATURE_NET_VERSION, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_feature_network(config: FeatureNetConfig, directory: str | None = None) -> tuple[FeatureNet, dict]:
    """The trained network for `config` and its cache metadata, training and caching it on first use."""
    root = cache_dir(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"feature-net-{config_hash(config)}.safetensors"
    with open(root / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            started, cpu_started = time.monotonic(), time.process_time()
            net, accuracy = train_feature_network(config)
            metadata = {
                "accuracy": f"{accuracy:.6f}",
                "config": json.dumps(asdict(config)),
                "version": FEATURE_NET_VERSION,
                "train_s": f"{time.monotonic() - started:.1f}",
                "train_cpu_s": f"{time.process_time() - cpu_started:.1f}",
                "torch": torch.__version__,
            }
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
            log.info(
                "trained the MNIST feature network in %ss: holdout accuracy %.4f -> %s",
                metadata["train_s"],
                accuracy,
                path,
            )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    net = FeatureNet(config)
    net.load_state_dict(load_file(str(path)))
    return net, {**metadata, "path": str(path)}


def feature_network(cache_dir: str | None = None, **kwargs) -> FeatureNet:
    """The MNIST FID feature extractor (eval mode, no grad): images in [-1,1] (B,1,28,28) -> (B, d).
    kwargs are FeatureNetConfig fields; trained once (~30-60 s on one core) and cached on disk."""
    net, _ = cached_feature_network(FeatureNetConfig(**kwargs), cache_dir)
    return net.eval().requires_grad_(False)


def feature_network_accuracy(cache_dir: str | None = None, **kwargs) -> float:
    """Holdout test accuracy of the feature network for these kwargs (from the cache metadata)."""
    _, metadata = cached_feature_network(FeatureNetConfig(**kwargs), cache_dir)
    return float(metadata["accuracy"])
