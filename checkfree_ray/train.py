"""`run_training(spec)`: pipeline training in this driver, then result.json, metrics.parquet and a plot.

A rerun of the same spec into the same output resumes the run recorded there (`run.json`) from its newest
complete checkpoint: weights, Adam state, step, data position and failure draws (both functions of the step),
recovery norms and the history so far. A different spec is refused unless `restart` is set.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import math
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.lr_schedule import scheduled_lr
from checkfree_ray.mfu import device_peak_flops, mfu
from checkfree_ray.plots import loss_vs_time_png
from checkfree_ray.run_identity import RunIdentity, open_run, write_run_record
from checkfree_ray.training_timeline import TIMELINE_FILE, start_training_timeline
from rayops import storage
from rayops.artifacts import write_artifact
from rayops.cluster_timeline import timeline_png
from rayops.output_lock import OutputLock
from rayops.progress import ProgressLine
from rayops.session import ray_session
from schemas.errors import RecoveryError, StorageError
from schemas.train import TrainSpec
from schemas.train_result import TrainResult

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "ray", "lcsc-checkfree-ray"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _progress_fields(executor: PipelineExecutor, tokens_per_step: int, peak_flops: float | None) -> dict:
    h = executor.history
    step_s = _median(h.step_times[-20:]) or float("nan")
    last = h.failures[-1].recovery_s if h.failures else None
    tokens_per_s = tokens_per_step / step_s
    fields = {
        "loss": h.losses[-1] if h.losses else float("nan"),
        "lr": scheduled_lr(executor.spec.optim, max(1, (h.steps or [1])[-1]), executor.spec.steps),
        "tok/s": tokens_per_s,
    }
    utilisation = mfu(tokens_per_s, executor.cfg.parameter_count(), peak_flops, executor.S)
    if utilisation is not None:
        fields["mfu"] = utilisation
    if h.val_losses:
        fields |= {"val_loss": h.val_losses[-1], "val_ppl": math.exp(h.val_losses[-1])}
    if (
        h.checkpoint_intervals
    ):  # hybrid: the checkpoint interval now (its reasons are in the log and the result)
        fields["ckpt_every"] = h.checkpoint_intervals[-1]["every"]
    return fields | {"failures": len(h.failures), "last_recovery_s": last if last is not None else "-"}


def peak_flops_of(executor: PipelineExecutor) -> float | None:
    """Peak FLOP/s of one stage's device: the spec's, or a known GPU's (asked of stage 0); None on CPU."""
    import ray

    name = None
    if executor.spec.pipeline.num_gpus_per_stage > 0 and executor.actors:
        name = ray.get(executor.actors[0].ping.remote(), timeout=executor.step_timeout()).get("device_name")
    return device_peak_flops(executor.spec, name)


def train_loop(
    executor: PipelineExecutor,
    progress: ProgressLine | None = None,
    first_step: int = 1,
    peak_flops: float | None = None,
    guard: Callable[[], None] | None = None,
) -> None:
    """Steps `first_step`..`spec.steps` (or until the target validation loss), evaluating every `eval_every` steps
    and after the last one (`_finish`: stages lost after the last commit are recovered first); the progress line
    follows each step's evaluation. `guard` (the output lock's `check`) runs before each step: a run whose lock
    was lost stops there with the lock's error, and stays resumable from its newest complete checkpoint."""
    spec = executor.spec
    pipe = spec.pipeline
    tokens_per_step = pipe.micro_batches * pipe.micro_batch_size * spec.model.seq_len
    step = first_step
    seen = {
        "failures": len(executor.history.failures),
        "intervals": len(executor.history.checkpoint_intervals),
    }
    while step <= spec.steps:
        if guard is not None:
            guard()
        step_done = step
        step = executor.run_step(step)
        value = None
        if step == step_done + 1 and step_done == spec.steps:
            step, value = _finish(executor, step_done)  # a rollback there runs the lost steps again
        elif step == step_done + 1 and step_done % spec.eval_every == 0:
            value = executor.evaluate(
                step_done
            )  # None when a stage died meanwhile: the next step recovers it
        if progress is not None:
            _report(executor, progress, seen, min(step - 1, spec.steps), tokens_per_step, peak_flops)
        if value is not None and spec.target_val_loss is not None and value <= spec.target_val_loss:
            break


def _finish(executor: PipelineExecutor, last: int) -> tuple[int, float | None]:
    """After the last step, which no step follows to recover a stage lost since its commit: recover such stages
    (recorded at step `last` + 1, 'before_step', as any loss between two steps), then the final evaluation, again
    after a recovery if a stage dies during it. Returns the next step to run (`last` + 1, or the step after the
    checkpoint a rollback restored) and the validation loss (None after a rollback)."""
    for _attempt in range(executor.spec.recovery.max_step_retries + 1):
        next_step = executor.recover_lost(last + 1)
        if next_step <= last:
            return next_step, None
        value = executor.evaluate(last)
        if value is not None:
            return next_step, value
    raise RecoveryError(
        f"the final evaluation after step {last} failed {executor.spec.recovery.max_step_retries + 1} times: stages "
        "keep dying. Raise `recovery.max_step_retries` or check the cluster's health"
    )


def _report(
    executor: PipelineExecutor,
    progress: ProgressLine,
    seen: dict[str, int],
    done: int,
    tokens_per_step: int,
    peak_flops: float | None,
) -> None:
    """The new failures and hybrid checkpoint intervals as events, then the progress line."""
    h = executor.history
    for failure in h.failures[seen["failures"] :]:
        progress.emit(
            f"failure: stage {failure.stage} at step {failure.step} -> {failure.method} "
            f"in {failure.recovery_s:.3f}s"
            + (f" (rolled back to {failure.rolled_back_to})" if failure.rolled_back_to is not None else "")
        )
    seen["failures"] = len(h.failures)
    for chosen in h.checkpoint_intervals[seen["intervals"] :]:  # hybrid: each new interval and why
        progress.emit(
            f"checkpoint every {chosen['every']} steps from step {chosen['step']}: {chosen['reason']}"
        )
    seen["intervals"] = len(h.checkpoint_intervals)
    progress.update(done=done, **_progress_fields(executor, tokens_per_step, peak_flops))


def build_result(
    executor: PipelineExecutor, wall_time_s: float, peak_flops: float | None = None
) -> TrainResult:
    """The result of a finished run; throughput counts the kept steps' tokens over the time of every step run."""
    spec, h = executor.spec, executor.history
    pipe = spec.pipeline
    rolled_back = h.rolled_back + [False] * (len(h.steps) - len(h.rolled_back))
    kept = len(h.steps) - sum(rolled_back)
    tokens = pipe.micro_batches * pipe.micro_batch_size * spec.model.seq_len * kept
    target = spec.target_val_loss
    reached = [s for s, v in zip(h.val_steps, h.val_losses) if target is not None and v <= target]
    tokens_per_s = tokens / sum(h.step_times) if h.step_times else 0.0
    return TrainResult(
        spec=spec,
        steps=h.steps,
        losses=h.losses,
        wall_times=h.wall_times,
        rolled_back=rolled_back,
        val_steps=h.val_steps,
        val_losses=h.val_losses,
        val_perplexities=[math.exp(v) for v in h.val_losses],
        failures=h.failures,
        final_val_loss=h.val_losses[-1] if h.val_losses else None,
        final_perplexity=math.exp(h.val_losses[-1]) if h.val_losses else None,
        steps_to_target=reached[0] if reached else None,
        tokens_per_s=tokens_per_s,
        model_parameters=executor.cfg.parameter_count(),
        mfu=mfu(tokens_per_s, executor.cfg.parameter_count(), peak_flops, executor.S),
        median_step_s=_median(h.step_times),
        wall_time_s=wall_time_s,
        costs=dict(h.costs),
        checkpoint_intervals=h.checkpoint_intervals,
        node_events=h.node_events,
        versions=_versions(),
        resumed_from=list(executor.resumed_from),
        run_id=executor.checkpoints.run.run_id if executor.checkpoints is not None else None,
    )


def _metrics_parquet(result: TrainResult) -> bytes:
    rolled_back = result.rolled_back or [False] * len(result.steps)
    table = pa.table(
        {
            "step": result.steps,
            "loss": result.losses,
            "wall_time_s": result.wall_times,
            "rolled_back": rolled_back,
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_result(result: TrainResult, uri: str) -> TrainResult:
    """Write result.json, metrics.parquet and loss_vs_time.png (and cluster_timeline.png when the cluster's
    nodes changed) under `uri` (manifest last)."""
    names = ["result.json", "metrics.parquet", "loss_vs_time.png"]
    if result.cluster_timeline is not None:
        names.append(TIMELINE_FILE)
    result.files = {name: storage.join(uri, name) for name in names}
    result.files["hf"] = storage.join(uri, "hf")  # the trained model, written by `export_model`
    files = {
        "metrics.parquet": _metrics_parquet(result),
        "loss_vs_time.png": loss_vs_time_png(result),
    }
    if result.cluster_timeline is not None:
        files[TIMELINE_FILE] = timeline_png(result.cluster_timeline, f"{result.spec.name}: cluster timeline")
    files["result.json"] = result.model_dump_json(indent=2).encode()
    write_artifact(uri, files, metadata={"kind": "train_result", "name": result.spec.name})
    return result


def _finished_result(spec: TrainSpec, run: RunIdentity) -> TrainResult | None:
    """The stored result of `run` when it already finished (a resubmitted job), else None."""
    try:
        stored = TrainResult.model_validate_json(
            storage.read_bytes(storage.join(spec.output.uri, "result.json"))
        )
    except (StorageError, ValueError):
        return None
    return stored if stored.run_id == run.run_id else None


def run_training(spec: TrainSpec, progress: bool = True, restart: bool = False) -> TrainResult:
    """Train `spec` with stage actors on Ray (in this driver) and write the result to `spec.output.uri`.

    A rerun into an output holding the same spec's run resumes it from its newest complete checkpoint (or
    returns its result when it had finished); a different spec raises `RunConflictError` unless `restart`.
    One run per output: the output's lock (`rayops.output_lock`) is taken before anything is read or written
    there, so a second run into a running one's output is refused with the owner's name (`OutputLockedError`).
    """
    with OutputLock(spec.output.uri, what="training") as lock:
        return _run_locked(spec, progress, restart, lock.check)


def _run_locked(spec: TrainSpec, progress: bool, restart: bool, guard: Callable[[], None]) -> TrainResult:
    """`run_training` under the output's lock; `guard` raises once the lock is lost."""
    run = open_run(spec, restart=restart)
    if run.finished and (done := _finished_result(spec, run)) is not None:
        log.info("run %s in %s already finished; returning its result", run.run_id, spec.output.uri)
        return done
    checkpoint_uri = spec.checkpointing.uri or storage.join(spec.output.uri, "checkpoints")
    started = time.monotonic()
    with ray_session(spec.ray):
        executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri, run=run)
        resume = _resume_point(executor) if run.resumed else None
        timeline = start_training_timeline(executor)  # nodes, stages alive and steps done, against time
        try:
            executor.start(resume)
            line = ProgressLine(f"train[{spec.recovery.strategy}]", total=spec.steps) if progress else None
            peak_flops = peak_flops_of(executor)
            train_loop(
                executor,
                line,
                first_step=resume.step + 1 if resume is not None else 1,
                peak_flops=peak_flops,
                guard=guard,
            )
            executor.finish_checkpoints()
            guard()
            export_model(executor, storage.join(spec.output.uri, "hf"))
        finally:
            executor.shutdown()
            timeline.stop()
    before_resume = ((resume.history or {}).get("wall_times") or [0.0])[-1] if resume is not None else 0.0
    result = build_result(executor, time.monotonic() - started + before_resume, peak_flops)
    result.cluster_timeline = timeline.section()  # None on a cluster whose nodes did not change
    guard()
    result = write_result(result, spec.output.uri)
    write_run_record(spec, run, status="finished")
    return result


def export_model(executor: PipelineExecutor, uri: str) -> None:
    """Write the trained model as a Hugging Face Llama folder (`LlamaForCausalLM.from_pretrained` loads it)."""
    import ray

    from checkfree_ray.data import tokenizer_uri
    from checkfree_ray.hf_llama import export_hf, read_hf_config

    spec = executor.spec
    states = ray.get([a.get_state.remote() for a in executor.actors], timeout=executor.step_timeout())
    base = read_hf_config(spec.model.hf_path) if spec.model.hf_path is not None else None
    tokenizer = tokenizer_uri(spec.data)
    step = (executor.history.steps or [0])[-1]
    export_hf(
        states,
        executor.cfg,
        uri,
        base_config=base,
        metadata={"name": spec.name, "step": step},
        source_path=spec.model.hf_path,
        tokenizer_json=storage.read_bytes(tokenizer) if tokenizer is not None else None,
    )
    log.info("exported the model as a Hugging Face Llama folder to %s", uri)


def _resume_point(executor: PipelineExecutor):
    """The newest complete checkpoint of the resumed run (None: it has none yet, so it starts over)."""
    store = executor.checkpoints
    if store is None or not store.steps():
        log.warning(
            "resuming run %s: it has no complete checkpoint yet; starting it from step 1",
            executor.checkpoints.run.run_id if store is not None else "?",
        )
        return None
    checkpoint = store.load_latest(executor.S, context="resume")
    log.info("resuming run %s from checkpoint %d", store.run.run_id, checkpoint.step)
    return checkpoint
