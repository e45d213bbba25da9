"""`checkfree-ray demo`: CheckFree+ on the local Ray, stage processes killed on a schedule, recoveries live.

The spec (examples/train_demo.yaml, else `DEFAULT_SPEC`) kills a middle stage, the first, the last and
another middle one. The progress line prints each failure as it is recovered; at the end a summary table
lists the failures (step, stage, how the stage was rebuilt, recovery time) and compares the final
validation loss with the same run without failures, and `vs_no_failures.png` draws both runs' loss against
step.

Ray itself reports each killed stage process on the driver's stdout as "(raylet) A worker died or was killed
while executing a task by an unexpected system error..." (the raylet's error channel, printed whatever
`log_to_driver` says). Those lines are the demo's own kills; the demo says so before the run starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click
import ray

from checkfree_ray.plots import loss_vs_step_with_twin_png
from rayops import storage
from rayops.session import apply_local_ray_env, ray_session, resolve_address
from schemas.loader import load_spec
from schemas.train import TrainSpec
from schemas.train_result import FailureRecord, TrainResult

DEMO_SPEC_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_demo.yaml"
DEFAULT_SPEC = {
    "name": "checkfree-demo",
    "steps": 240,
    "eval_every": 20,
    "eval_batches": 2,
    "model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64},
    "pipeline": {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 8, "num_cpus_per_stage": 0.4},
    "optim": {"lr": 3e-3},
    "recovery": {"strategy": "checkfree+"},
    "checkpointing": {"every": 50},
    "failures": {"schedule": [[50, 1], [100, 0], [150, 3], [200, 2]]},
    "output": {"uri": "outputs/checkfree-demo"},
}


def demo_spec(spec_file: str | Path | None = None, out_dir: str | None = None) -> TrainSpec:
    """The demo's spec: `spec_file`, else examples/train_demo.yaml, else the built-in one; `out_dir` overrides
    `output.uri`."""
    path = Path(spec_file) if spec_file else DEMO_SPEC_PATH
    spec = (
        load_spec(path, TrainSpec) if spec_file or path.exists() else TrainSpec.model_validate(DEFAULT_SPEC)
    )
    if out_dir:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": out_dir})})
    return spec


def how_recovered(failure: FailureRecord, num_stages: int) -> str:
    """The rebuild of one failure in words."""
    i = failure.stage
    if failure.method == "checkfree":
        return f"weighted avg of S{i - 1},S{i + 1}"
    if failure.method == "copy":
        return f"copy of swap partner S{1 if i == 0 else num_stages - 2}"
    if failure.method == "checkpoint":
        return f"rollback to step {failure.rolled_back_to}"
    return failure.method


def format_summary(result: TrainResult, reference: TrainResult | None = None) -> str:
    """Failures table, then final validation loss and perplexity (and the no-failure reference's)."""
    num_stages = result.spec.pipeline.num_stages
    head = (
        f"{'step':>5} {'stage':>5}  {'recovered by':<30} {'recovery s':>10} {'kill->retry s':>13} {'warm':>5}"
    )
    lines = [head, "-" * len(head)]
    for f in result.failures:
        retry = "-" if f.death_to_retry_s is None else f"{f.death_to_retry_s:.3f}"
        lines.append(
            f"{f.step:>5} {f.stage:>5}  {how_recovered(f, num_stages):<30} {f.recovery_s:>10.3f} "
            f"{retry:>13} {'yes' if f.warm_standby else 'no':>5}"
        )
    lines.append("")
    rows = [("with failures", result)] + ([("no failures", reference)] if reference is not None else [])
    lines.append(f"{'run':<14} {'steps':>5} {'failures':>8} {'val loss':>9} {'perplexity':>10} {'wall s':>7}")
    for name, run in rows:
        loss = run.final_val_loss if run.final_val_loss is not None else math.nan
        ppl = run.final_perplexity if run.final_perplexity is not None else math.nan
        lines.append(
            f"{name:<14} {len(run.steps):>5} {len(run.failures):>8} {loss:>9.4f} {ppl:>10.3f} "
            f"{run.wall_time_s:>7.1f}"
        )
    if reference is not None and reference.final_val_loss and result.final_val_loss:
        lines.append(
            f"validation loss vs no failures: {result.final_val_loss - reference.final_val_loss:+.4f} "
            f"({result.final_perplexity / reference.final_perplexity:.3f}x perplexity)"
        )
    return "\n".join(lines)


def _quiet_local_ray(spec: TrainSpec) -> bool:
    """The stage kills are intended: keep Ray's reports of dead workers out of the demo's output (a local
    Ray started here without worker logs, which `ray_session` then uses). Returns whether it started one."""
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if ray.is_initialized() or resolve_address(spec.ray) is not None:
        return False
    apply_local_ray_env()
    ray.init(
        address="local",
        num_cpus=spec.ray.num_cpus,
        object_store_memory=spec.ray.object_store_memory,
        include_dashboard=False,
        namespace=spec.ray.namespace,
        log_to_driver=False,
    )
    return True


def run_demo(spec_file: str | None = None, out_dir: str | None = None, reference: bool = True) -> TrainResult:
    """Run the demo (and the no-failure reference), print the summary; returns the run with failures."""
    from checkfree_ray.train import run_training

    spec = demo_spec(spec_file, out_dir)
    click.echo(
        f"demo: {spec.recovery.strategy}, {spec.pipeline.num_stages} stages, {spec.steps} steps, "
        f"kills at (step, stage) {list(spec.failures.schedule)}",
        err=True,
    )
    if spec.failures.schedule:
        click.echo(
            "demo: Ray reports each of these kills as '(raylet) A worker died or was killed while executing a "
            "task by an unexpected system error': expected, those are the stage processes this demo kills",
            err=True,
        )
    started_here = _quiet_local_ray(spec)
    try:
        with ray_session(
            spec.ray
        ):  # one Ray for both runs; each demo is a new run (never resumes an earlier one)
            result = run_training(spec, progress=True, restart=True)
            baseline = None
            if reference:
                ref_spec = spec.model_copy(
                    update={
                        "name": f"{spec.name}-reference",
                        "failures": spec.failures.model_copy(
                            update={"schedule": [], "probability_per_step": None, "hourly_rate": None}
                        ),
                        "output": spec.output.model_copy(
                            update={"uri": storage.join(spec.output.uri, "reference")}
                        ),
                    }
                )
                click.echo("demo: the same run without failures, for reference", err=True)
                baseline = run_training(ref_spec, progress=True, restart=True)
    finally:
        if started_here:
            ray.shutdown()
    click.echo(format_summary(result, baseline))
    click.echo(f"plot: {result.files.get('loss_vs_time.png')}")
    if baseline is not None:
        twin_plot = storage.join(spec.output.uri, "vs_no_failures.png")
        storage.write_bytes(twin_plot, loss_vs_step_with_twin_png(result, baseline))
        click.echo(f"plot against the no-failure twin: {twin_plot}")
    return result
