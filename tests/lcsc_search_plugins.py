"""Samplers for the search tests: one that logs every call, one that kills its own process once."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.lcsc_plugins import toy_sample


def counting_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str) -> torch.Tensor:
    """toy_sample, appending one line per call to log_dir/calls.log (pid, seed, n)."""
    with open(Path(log_dir) / "calls.log", "a") as handle:
        handle.write(f"{os.getpid()} {seed} {n}\n")
    return toy_sample(model, n, seed, nfe, batch_size)


def crashing_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, crash_on_call: int = 3):
    """toy_sample, but the process dies (SIGKILL-like, no cleanup) on the `crash_on_call`-th call overall."""
    marker = Path(log_dir) / "calls.log"
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    calls = len(marker.read_text().splitlines())
    if calls == crash_on_call:
        (Path(log_dir) / "crashed").write_text(str(os.getpid()))
        os._exit(1)
    return toy_sample(model, n, seed, nfe, batch_size)
