"""The CheckFree Python SDK: train in this process, or submit the training as a Ray job."""

from __future__ import annotations

from pathlib import Path

from rayops.jobs import JobHandle, submit_spec
from schemas.loader import load_spec
from schemas.train import TrainResult, TrainSpec


def _as_spec(spec: TrainSpec | str | Path) -> TrainSpec:
    return spec if isinstance(spec, TrainSpec) else load_spec(spec, TrainSpec)


def run_training(spec: TrainSpec | str | Path, progress: bool = True) -> TrainResult:
    """Train in this driver; returns the result (also written to `output.uri`)."""
    from checkfree_ray.train import run_training as _run

    return _run(_as_spec(spec), progress=progress)


def submit_training(spec: TrainSpec | str | Path, address: str | None = None) -> JobHandle[TrainResult]:
    """Submit the training through Ray's Jobs API (a local head when no address); returns a `JobHandle`
    with `status()`, `wait()`, `result()`, `logs()`, `stop()` and `close()`."""
    return submit_spec(_as_spec(spec), "checkfree_ray", "train", TrainResult, address=address)
