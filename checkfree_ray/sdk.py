"""The CheckFree Python SDK: train in this process, or submit the training as a Ray job."""

from __future__ import annotations

from pathlib import Path

from rayops.jobs import JobHandle, submit_spec
from schemas.loader import load_spec
from schemas.train import TrainSpec
from schemas.train_result import TrainResult


def _as_spec(spec: TrainSpec | str | Path) -> TrainSpec:
    return spec if isinstance(spec, TrainSpec) else load_spec(spec, TrainSpec)


def run_training(spec: TrainSpec | str | Path, progress: bool = True, restart: bool = False) -> TrainResult:
    """Train in this driver; returns the result (also written to `output.uri`). A rerun of the same spec resumes
    its run from the newest complete checkpoint; `restart` starts a new run even over a different spec's."""
    from checkfree_ray.train import run_training as _run

    return _run(_as_spec(spec), progress=progress, restart=restart)


def submit_training(
    spec: TrainSpec | str | Path, address: str | None = None, restart: bool = False
) -> JobHandle[TrainResult]:
    """Submit the training through Ray's Jobs API (a local head when no address); returns a `JobHandle`
    with `status()`, `wait()`, `result()`, `logs()`, `stop()` and `close()`. The job resumes the same spec's run
    in `output.uri` (a resubmitted job continues); `restart` starts a new one."""
    return submit_spec(
        _as_spec(spec),
        "checkfree_ray",
        "train",
        TrainResult,
        address=address,
        extra_args=["--restart"] if restart else None,
    )
