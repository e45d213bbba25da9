"""The CheckFree benchmarks' shared setup: the benchmark model, one run measured, checkpoints on a real S3 server.

`paper_table2.py` and `recovery_ablation.py` train the same small LLaMa through `bench_spec` and `run_one`;
`cost_run` measures one strategy's per-step time without failures and the extra time of scheduled recoveries.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.train import train_loop
from schemas.errors import LcscCheckfreeError
from schemas.train import TrainSpec

BENCH_MODEL = {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64}
BENCH_PIPELINE = {
    "num_stages": 4,
    "micro_batches": 2,
    "micro_batch_size": 8,
    "num_cpus_per_stage": 0.4,
    "warm_standby": True,
}
EVAL_EVERY = 5  # steps between target checks (Table 2 samples the target at least every 5 steps)


def bench_spec(strategy: str, seed: int, steps: int, target: float | None, **extra) -> TrainSpec:
    """The benchmark's model and pipeline with `strategy`; `extra` merges into sections."""
    data = {
        "name": f"table2-{strategy}",
        "seed": seed,
        "steps": steps,
        "eval_every": EVAL_EVERY,
        "eval_batches": 2,
        "target_val_loss": target,
        "model": BENCH_MODEL,
        "pipeline": BENCH_PIPELINE,
        "optim": {"lr": 3e-3},
        "recovery": {"strategy": strategy},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainSpec.model_validate(data)


@contextlib.contextmanager
def s3_bucket(prefix: str = "table2") -> Iterator[str]:
    """A SeaweedFS S3 server on loopback (started and stopped here) with a fresh bucket; yields `s3://bucket`.
    Its credentials and endpoint go into this process's environment for the run's stages."""
    from rayops.s3_server import start_seaweedfs

    server = start_seaweedfs(Path(tempfile.mkdtemp(prefix=f"{prefix}-s3-")))
    os.environ.update(server.env())
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    server.create_bucket(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()


def _train(spec: TrainSpec, checkpoint_uri: str | None) -> tuple[PipelineExecutor, str | None, float]:
    """Train in this process's Ray; returns the executor (shut down), the error of a failed run, the wall time."""
    executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
    error = None
    try:
        executor.start()
        train_loop(executor)
    except (LcscCheckfreeError, ray.exceptions.RayError) as exc:  # an unrecoverable run is a result
        error = f"{type(exc).__name__}: {exc}"
    finally:
        elapsed = time.monotonic() - executor.start_time
        executor.shutdown()
    return executor, error, elapsed


def run_one(spec: TrainSpec, checkpoint_uri: str | None = None) -> dict:
    """One run to the target (or `spec.steps`); returns its measurements (never raises on a failed run)."""
    executor, error, elapsed = _train(spec, checkpoint_uri)
    h = executor.history
    target = spec.target_val_loss
    reached_at = next(
        (s for s, v in zip(h.val_steps, h.val_losses) if target is not None and v <= target), None
    )
    recoveries = recovery_methods([f.model_dump() for f in h.failures])
    return {
        "strategy": spec.recovery.strategy,
        "seed": spec.seed,
        "reached": reached_at is not None,
        "error": error,
        "steps_to_target": reached_at,
        "executed_steps": len(h.steps),
        "last_step": h.steps[-1] if h.steps else 0,
        "wall_s": elapsed,
        "train_wall_s": elapsed - _startup_s(h),
        "median_step_s": statistics.median(h.step_times) if h.step_times else None,
        "failures": [f.model_dump() for f in h.failures],
        "recoveries": len(recoveries),
        "recovery_methods": recoveries,
        "recovery_s_total": sum(f.recovery_s for f in h.failures),
        "rolled_back_steps": sum(_lost_steps(f) for f in h.failures),
        "checkpoint_save_s_total": h.costs.get("checkpoint_save_s_total", 0.0),
        "val_steps": h.val_steps,
        "val_losses": h.val_losses,
        "val_wall_s": _val_times(h),
        "final_val_loss": h.val_losses[-1] if h.val_losses else None,
        "costs": dict(h.costs),
    }


def recovery_kind(failure: dict) -> str:
    """'method/warm' or 'method/cold': 'checkpoint' when the recovery rolled back, else the method that rebuilt
    the stage ('checkfree', 'copy', 'redundant'); warm when a pre-started standby took the stage."""
    method = "checkpoint" if failure["rolled_back_to"] is not None else failure["method"]
    return f"{method}/{'warm' if failure['warm_standby'] else 'cold'}"


def recovery_methods(failures: list[dict]) -> list[str]:
    """One `recovery_kind` per recovery (stages lost together are one recovery, cold if any stage was)."""
    by_event: dict[tuple, list[str]] = {}
    for failure in failures:
        by_event.setdefault((failure["step"], failure["rolled_back_to"]), []).append(recovery_kind(failure))
    return [max(kinds, key=lambda kind: kind.endswith("/cold")) for kinds in by_event.values()]


def cost_run(
    strategy: str,
    seed: int,
    window: tuple[int, int],
    kills: list[tuple[int, int]],
    steps: int,
    checkpoint_every: int | None,
    checkpoint_uri: str | None,
) -> dict:
    """Per-step seconds of `strategy` over the committed steps in `window` (no failure before its end), then the
    scheduled `kills` ((step, stage)) and each one's commit times around it; no evaluation until the last step."""
    extra = {"checkpointing": {"every": checkpoint_every}} if checkpoint_every else {}
    spec = bench_spec(
        strategy, seed, steps, None, eval_every=steps, failures={"schedule": kills, "seed": seed}, **extra
    )
    executor, error, elapsed = _train(spec, checkpoint_uri)
    h = executor.history
    kill_offsets = {
        f"{step}:{stage}": at - executor.start_time
        for (step, stage), at in executor.injector.kill_times.items()
    }
    return {
        "strategy": strategy,
        "seed": seed,
        "error": error,
        "wall_s": elapsed,
        "window": list(window),
        "steps": list(h.steps),
        "wall_times": list(h.wall_times),
        "kill_offsets": kill_offsets,
        "failures": [f.model_dump() for f in h.failures],
        "costs": dict(h.costs),
    }


def _startup_s(h) -> float:
    """Seconds before step 1 started (the stage processes starting, slow and variable on a loaded machine)."""
    return h.wall_times[0] - h.step_times[0] if h.wall_times else 0.0


def _lost_steps(failure) -> int:
    return failure.step - failure.rolled_back_to - 1 if failure.rolled_back_to is not None else 0


def _val_times(h) -> list[float]:
    """Wall time of each evaluation: that of the step committed just before it (step numbers repeat after a
    rollback, so walk the history in order)."""
    times, i = [], 0
    for val_step in h.val_steps:
        while i < len(h.steps) and h.steps[i] != val_step:
            i += 1
        times.append(h.wall_times[i] if i < len(h.steps) else float("nan"))
        i += 1
    return times
