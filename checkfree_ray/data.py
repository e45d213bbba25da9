"""Byte-level text that ships with Python, split into train and a held-out validation tail; batches by seed.

Every random draw of a run comes from its own stream of `np.random.SeedSequence(seed)`: data order,
validation windows and failure draws never correlate, and each step's draw is a pure function of
(seed, stream, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import numpy as np
import torch

from schemas.train import DataSpec

DATA_STREAM, VALIDATION_STREAM, FAILURE_STREAM = 0, 1, 2


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The generator of `step` in `stream`: child `step` of child `stream` of `SeedSequence(seed)`.

    Equal to `SeedSequence(seed).spawn(stream + 1)[stream].spawn(step + 1)[step]`, without spawning the others.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, step)))


@functools.lru_cache(maxsize=4)
def load_text_bytes(source: str) -> bytes:
    """'python-docs': pydoc_data topics (~465k chars of prose); 'python-stdlib': the stdlib's .py files."""
    if source == "python-docs":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py"))
        return b"\n\n".join(p.read_bytes() for p in files)
    raise ValueError(f"unknown data.source {source!r}; use 'python-docs' or 'python-stdlib'")


class ByteCorpus:
    """Train and validation byte arrays; `train_batch(step)` is a pure function of (seed, step)."""

    def __init__(self, spec: DataSpec, seq_len: int, seed: int):
        data = np.frombuffer(load_text_bytes(spec.source), dtype=np.uint8)
        split = int(len(data) * (1.0 - spec.val_fraction))
        self.train, self.val = data[:split], data[split:]
        self.seq_len, self.seed = seq_len, seed
        if len(self.val) <= seq_len + 1:
            raise ValueError(f"data.val_fraction {spec.val_fraction} leaves too little text for seq_len {seq_len}")

    def _windows(self, data: np.ndarray, starts: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = torch.from_numpy(data[idx].astype(np.int64)).view(*shape, self.seq_len + 1)
        return windows[..., :-1].contiguous(), windows[..., 1:].contiguous()  # inputs, targets (M, B, T)

    def train_batch(self, step: int, micro_batches: int, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (M, B, T) of one step; the same (seed, step) always gives the same batch."""
        rng = step_rng(self.seed, DATA_STREAM, step)
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=micro_batches * micro_batch_size)
        return self._windows(self.train, starts, (micro_batches, micro_batch_size))

    def val_batches(self, count: int, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed validation set of `count` micro-batches (M, B, T), the same at every evaluation."""
        rng = step_rng(self.seed, VALIDATION_STREAM, 0)
        starts = rng.integers(0, len(self.val) - self.seq_len - 1, size=count * micro_batch_size)
        return self._windows(self.val, starts, (count, micro_batch_size))


def tokenizer_vocab_size(spec: DataSpec) -> int | None:
    """Vocabulary size of the spec's tokenizer (None: byte-level, 256)."""
    return None
