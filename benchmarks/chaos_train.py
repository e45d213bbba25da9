"""Chaos for CheckFree training: seeded runs that kill stage processes, the driver, and a worker node.

`python benchmarks/chaos_train.py --runs N` runs, for each seed 0..N-1, three kinds of failure:

- **stages**: `python -m checkfree_ray train spec.yaml` with random stage kills (`failures.probability_per_step`,
  the seed's draws; adjacent losses roll back to a checkpoint);
- **driver**: the same command SIGKILLed once a seed-chosen checkpoint is complete, then run again (it resumes);
- **node**: a worker node of a local 3-node cluster removed mid-run (`tests/node_loss_demo.py`, its own cluster);
- **backup** (two events in one step): the redundant strategy, one stage killed after its optimizer step of a
  seed-chosen step, before its backup copy lands; the final weights must equal failure-free training's (the
  single-process reference, `model.ReferenceTrainer`) to `EXACT_ATOL`;
- **norm** (two events in one step): global clipping, a middle stage killed after its backward, before its
  gradient norm; only that stage may be lost and CheckFree must rebuild it (no rollback).

The two-event kinds run in this process (the stage's fault is armed at the exact call, `stage_faults.py`), with
`train_loop` as the CLI runs it, checkpoints on.

Every run must finish with every step 1..steps kept exactly once (steps discarded by a rollback are marked and
not counted), and leave no actor alive and no placement group behind (checked on the Ray it ran on, after the
run, with a bounded wait). Prints a table and writes `benchmarks/results/chaos_train.json` and `.md` (`--quick`:
under `outputs/bench/quick/`, never over a full result).

Runtime on 2 shared cores: about 1-3 minutes per run, so ~9 minutes for 3 seeds x the first 3 kinds (measured
544 s at load 11-17) plus ~1 minute per two-event run; `--quick` runs one seed of each kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from _common import QUICK_RESULTS, ROOT, local_ray

from schemas.loader import dump_spec
from schemas.train import TrainSpec

STEPS, CHECKPOINT_EVERY, KILL_PROBABILITY = 24, 4, 0.03
RUN_TIMEOUT_S, LEAK_WAIT_S = 600.0, 60.0
KINDS = ("stages", "driver", "node", "backup", "norm")
# Two events in one step: (strategy, optim.clip, the stage call that dies); the kill waits REPLY_FLUSH_S first so
# that the stage's earlier replies reach the driver (`stage_faults.arm_fault`).
TWO_EVENT = {
    "backup": ("redundant", "per_stage", "get_state"),
    "norm": ("checkfree", "global", "grad_sq_norm"),
}
TWO_EVENT_STREAM, REPLY_FLUSH_S, EXACT_ATOL = 7, 0.5, 1e-6


def chaos_spec(
    output: str, seed: int, probability: float, strategy: str = "checkfree", clip: str = "per_stage"
) -> TrainSpec:
    """A d=32, 4-layer, 4-stage run into `output` (CheckFree unless `strategy`), killing each stage with
    `probability` per step."""
    return TrainSpec.model_validate(
        {
            "name": f"chaos-{seed}",
            "steps": STEPS,
            "eval_every": STEPS,
            "eval_batches": 1,
            "seed": seed,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "optim": {"lr": 3e-3, "clip": clip},
            "recovery": {"strategy": strategy},
            "checkpointing": {"every": CHECKPOINT_EVERY},
            "failures": {"probability_per_step": probability, "seed": seed},
            "output": {"uri": output},
        }
    )


def step_accounting(steps: list[int], rolled_back: list[bool] | None, expected: int) -> dict:
    """Kept steps (not discarded by a rollback) against 1..expected: those lost and those counted twice."""
    rolled_back = rolled_back or [False] * len(steps)
    kept = [step for step, gone in zip(steps, rolled_back) if not gone]
    return {
        "kept_steps": len(kept),
        "lost_steps": sorted(set(range(1, expected + 1)) - set(kept)),
        "counted_twice": sorted({s for s in kept if kept.count(s) > 1}),
        "extra_steps": sorted(set(kept) - set(range(1, expected + 1))),
    }


def leaks(wait_s: float = LEAK_WAIT_S) -> dict:
    """Actors still alive and placement groups not removed on the connected Ray, after waiting (bounded) for a
    dead driver's to be cleaned up."""
    import ray
    from ray._private import state

    deadline = time.monotonic() + wait_s
    while True:
        alive = len(state.actors(actor_state_name="ALIVE"))
        groups = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
        if (alive == 0 and groups == 0) or time.monotonic() > deadline:
            return {"leaked_actors": alive, "leaked_placement_groups": groups}
        time.sleep(0.5)


def _train(spec_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "checkfree_ray", "train", str(spec_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate(timeout=60)
    return process.returncode, err.decode(errors="replace")[-2000:]


def _result(out: Path, rc: int, err: str) -> dict:
    if rc != 0 or not (out / "result.json").exists():
        return {"finished": False, "error": err}
    result = json.loads((out / "result.json").read_text())
    return {
        "finished": True,
        **step_accounting(result["steps"], result.get("rolled_back"), STEPS),
        "failures": len(result["failures"]),
        "rollbacks": sum(f["rolled_back_to"] is not None for f in result["failures"]),
        "resumed_from": result.get("resumed_from") or [],
    }


def run_stage_kills(seed: int, work: Path, env: dict) -> dict:
    """Random stage kills drawn from the seed; the run finishes on its own."""
    out = work / f"stages-{seed}"
    dump_spec(chaos_spec(str(out), seed, KILL_PROBABILITY), work / f"stages-{seed}.yaml")
    return _result(out, *_finish(_train(work / f"stages-{seed}.yaml", env)))


def run_driver_kill(seed: int, work: Path, env: dict) -> dict:
    """SIGKILL the driver once checkpoint k (seed-chosen) is complete, then run the same command again."""
    out, spec_path = work / f"driver-{seed}", work / f"driver-{seed}.yaml"
    dump_spec(chaos_spec(str(out), seed, KILL_PROBABILITY), spec_path)
    at = CHECKPOINT_EVERY * (1 + seed % (STEPS // CHECKPOINT_EVERY - 2))
    driver = _train(spec_path, env)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    marker = f"run-*/checkpoint_{at:06d}/MANIFEST.json"
    while (
        driver.poll() is None and not any((out / "checkpoints").glob(marker)) and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    killed = driver.poll() is None
    if killed:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    return {
        **_result(out, *_finish(_train(spec_path, env))),
        "driver_killed_after_checkpoint": at if killed else None,
    }


def run_node_loss(seed: int) -> dict:
    """A worker node removed mid-run, in a fresh process with its own 3-node cluster."""
    with tempfile.TemporaryDirectory(prefix="chaos-node-") as out:
        done = subprocess.run(
            [sys.executable, "-m", "tests.node_loss_demo", out, str(seed)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"finished": False, "error": (done.stderr or done.stdout)[-2000:]}
    report = json.loads(lines[-1].removeprefix("RESULT "))
    return {
        "finished": True,
        **step_accounting(report["steps"], report["rolled_back"], report["expected_steps"]),
        "failures": len(report["failures"]),
        "rollbacks": sum(f["rolled_back_to"] is not None for f in report["failures"]),
        "leaked_actors": report["leaked_actors"],
        "leaked_placement_groups": report["leaked_placement_groups"],
    }


def two_event_point(kind: str, seed: int) -> tuple[int, int]:
    """(step, stage) of a two-event kind's kill, from the seed's own stream: a step in 2..STEPS-1, any stage for
    'backup', a middle one for 'norm' (CheckFree rebuilds middle stages; an outer one rolls back by design)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, TWO_EVENT_STREAM, list(TWO_EVENT).index(kind)]))
    stage = int(rng.integers(0, 4)) if kind == "backup" else int(rng.integers(1, 3))
    return int(rng.integers(2, STEPS)), stage


def _arm(step: int, stage: int, call: str):
    """A `before_step` hook that arms `stage` before `step` to die at its next `call`."""
    import ray

    def arm(ex, at: int) -> None:
        if at == step and not armed:
            armed.append(at)
            ray.get(ex.actors[stage].arm_fault.remote(call, "kill", REPLY_FLUSH_S, 0), timeout=60)

    armed: list[int] = []
    return arm


def reference_difference(spec: TrainSpec, corpus, states: list[dict]) -> float:
    """Largest |weight - failure-free single-process training's weight| over every stage, after STEPS steps."""
    from checkfree_ray.lr_schedule import lr_factor
    from checkfree_ray.model import ModelConfig, ReferenceTrainer
    from checkfree_ray.stage import initial_stage_state

    pipe = spec.pipeline
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, pipe.num_stages), spec.seed, spec.optim.lr)
    for step in range(1, STEPS + 1):
        reference.train_step(
            *corpus.train_batch(step, pipe.micro_batches, pipe.micro_batch_size),
            [list(range(pipe.num_stages))] * pipe.micro_batches,
            lr_factor(spec, step),
        )
    return max(
        float((state[key] - value).abs().max())
        for stage, state in enumerate(states)
        for key, value in initial_stage_state(reference.parts, stage).items()
    )


def run_two_event(kind: str, seed: int, work: Path) -> dict:
    """One two-event run in this process: the seed's stage dies at the exact call, the run goes on to the end."""
    import ray

    from checkfree_ray.executor import PipelineExecutor
    from checkfree_ray.train import train_loop
    from schemas.errors import LcscCheckfreeError

    strategy, clip, call = TWO_EVENT[kind]
    step, stage = two_event_point(kind, seed)
    spec = chaos_spec(str(work / f"{kind}-{seed}"), seed, 0.0, strategy, clip)
    executor = PipelineExecutor(spec, checkpoint_uri=str(work / f"{kind}-{seed}" / "checkpoints"))
    executor.before_step.append(_arm(step, stage, call))
    event = {"event_step": step, "event_stage": stage, "event_call": call}
    try:
        executor.start()
        train_loop(executor)
        executor.finish_checkpoints()
        states = executor.stage_states() if kind == "backup" else None
    except (LcscCheckfreeError, ray.exceptions.RayError) as exc:  # the run failed: its row says why
        return {"finished": False, "error": f"{type(exc).__name__}: {exc}"[-2000:], **event}
    finally:
        executor.shutdown()
    h = executor.history
    row = {
        "finished": True,
        **step_accounting(h.steps, h.rolled_back, STEPS),
        **event,
        "failures": len(h.failures),
        "rollbacks": sum(f.rolled_back_to is not None for f in h.failures),
        "lost": [[f.step, f.stage, f.method, f.phase] for f in h.failures],
    }
    if states is not None:
        row["max_abs_diff_vs_failure_free"] = reference_difference(spec, executor.corpus, states)
    return row


def passed(row: dict) -> bool:
    """A run passes when it finished with every step kept once and leaked nothing; a two-event run also lost only
    its stage, at its step, without a rollback, and (backup) ends at failure-free training's weights."""
    ok = (
        bool(row.get("finished"))
        and not row["lost_steps"]
        and not row["counted_twice"]
        and not row["extra_steps"]
        and row["leaked_actors"] == 0
        and row["leaked_placement_groups"] == 0
    )
    if ok and row.get("kind") in TWO_EVENT:
        method = "redundant" if row["kind"] == "backup" else "checkfree"
        ok = (
            row["lost"] == [[row["event_step"], row["event_stage"], method, "optimizer"]]
            and row["rollbacks"] == 0
        )
        ok = ok and row.get("max_abs_diff_vs_failure_free", 0.0) <= EXACT_ATOL
    return ok


def chaos(
    runs: int, kinds: tuple[str, ...] = KINDS, out: Path = QUICK_RESULTS, fresh: bool = True
) -> list[dict]:
    """Every kind of failure for seeds 0..runs-1 (a harness sweep: kinds x seeds, rows kept under `out`'s row
    cache, so that a killed study resumes unless `fresh`); one row per run."""
    import ray

    with tempfile.TemporaryDirectory(prefix="chaos-train-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if {"stages", "driver", *TWO_EVENT} & set(kinds):
            stack.enter_context(local_ray(num_cpus=2))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if ray.is_initialized():
            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

        def measure(kind: str, _kind: str, seed: int) -> dict:
            started = time.monotonic()
            if kind == "node":
                row = run_node_loss(seed)
            elif kind in TWO_EVENT:
                row = {**run_two_event(kind, seed, work), **leaks()}
            else:
                row = (run_stage_kills if kind == "stages" else run_driver_kill)(seed, work, env)
                row.update(leaks())
            row.update(kind=kind, seed=seed, wall_s=round(time.monotonic() - started, 1))
            row["passed"] = passed(row)
            print(_line(row), flush=True)
            if not row.get("finished"):
                print(row.get("error", ""), flush=True)
            return row

        return harness.run_sweep(sweep_of(runs, kinds, measure), out, fresh=fresh)


def sweep_of(runs: int, kinds: tuple[str, ...], measure=None) -> harness.Sweep:
    """The study as a harness sweep: the kinds of failure as configs, seeds 0..runs-1."""
    return harness.Sweep(
        "chaos_train",
        configs={kind: kind for kind in kinds},
        seeds=list(range(runs)),
        measure=measure or (lambda *_: {}),
        describe=(
            f"{STEPS} steps, checkpoint every {CHECKPOINT_EVERY}, stage kill probability {KILL_PROBABILITY} per "
            "stage and step: each kind of failure on each seed must keep every step once and leak nothing"
        ),
        extra={
            "runs_per_kind": runs,
            "steps": STEPS,
            "kill_probability_per_stage_step": KILL_PROBABILITY,
            "checkpoint_every": CHECKPOINT_EVERY,
            "exact_atol": EXACT_ATOL,
        },
    )


def _line(row: dict) -> str:
    return (
        f"{row['kind']:7s} seed {row['seed']:2d}  {'ok  ' if row['passed'] else 'FAIL'}  "
        f"failures {row.get('failures', '-'):>2}  rollbacks {row.get('rollbacks', '-'):>2}  "
        f"kept {row.get('kept_steps', '-'):>3}  lost {row.get('lost_steps', '-')}  "
        f"twice {row.get('counted_twice', '-')}  leaked actors/pgs {row.get('leaked_actors', '-')}/"
        f"{row.get('leaked_placement_groups', '-')}  {row['wall_s']:.0f}s"
    )


def main() -> None:
    cli = harness.parser(__doc__, seeds=range(3), quick_seeds=range(1))
    cli.add_argument(
        "--runs", type=int, default=None, help="seeds per kind of failure (same as --seeds 0..N-1)"
    )
    cli.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = cli.parse_args()
    kinds = tuple(kind for kind in args.kinds.split(",") if kind)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        cli.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    seeds = list(range(args.runs)) if args.runs else harness.chosen_seeds(args)
    if seeds != list(range(len(seeds))):
        cli.error(f"--seeds must be 0..N-1 (each seed's kills are drawn from it and compared), got {seeds}")
    record = harness.run_record(args)
    started = time.monotonic()
    rows = chaos(len(seeds), kinds, harness.results_dir(args), fresh=args.fresh)
    summary = {kind: f"{sum(r['passed'] for r in rows if r['kind'] == kind)}/{len(seeds)}" for kind in kinds}
    print("passed:", summary)
    sweep = sweep_of(len(seeds), kinds)
    sweep.extra.update(wall_s=round(time.monotonic() - started, 1), passed=summary)
    harness.finish(
        sweep,
        args,
        record,
        rows,
        sections=[("Runs", table_markdown(rows))],
        notes=[f"passed per kind: {summary}"],
        title=f"chaos_train ({'quick: ' if args.quick else ''}{len(seeds)} seed(s) per kind)",
    )


def table_markdown(rows: list[dict]) -> str:
    """One line per run, generated from the measured values."""
    header = (
        "| kind | seed | passed | failures | rollbacks | kept steps | lost | twice | event (step, stage, call) "
        "| max abs diff vs failure-free | leaked actors/pgs | wall s |"
    )
    lines = [header, "|---" * 12 + "|"]
    for r in rows:
        event = f"{r['event_step']}, {r['event_stage']}, {r['event_call']}" if "event_step" in r else "-"
        diff = f"{r['max_abs_diff_vs_failure_free']:.1e}" if "max_abs_diff_vs_failure_free" in r else "-"
        lines.append(
            f"| {r['kind']} | {r['seed']} | {'yes' if r['passed'] else 'NO'} | {r.get('failures', '-')} | "
            f"{r.get('rollbacks', '-')} | {r.get('kept_steps', '-')} | {r.get('lost_steps', '-')} | "
            f"{r.get('counted_twice', '-')} | {event} | {diff} | {r.get('leaked_actors', '-')}/"
            f"{r.get('leaked_placement_groups', '-')} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
