"""Chaos for CheckFree training: seeded runs that kill stage processes, the driver, and a worker node.

`python benchmarks/chaos_train.py --runs N` runs, for each seed 0..N-1, three kinds of failure:

- **stages**: `python -m checkfree_ray train spec.yaml` with random stage kills (`failures.probability_per_step`,
  the seed's draws; adjacent losses roll back to a checkpoint);
- **driver**: the same command SIGKILLed once a seed-chosen checkpoint is complete, then run again (it resumes);
- **node**: a worker node of a local 3-node cluster removed mid-run (`tests/node_loss_demo.py`, its own cluster).

Every run must finish with every step 1..steps kept exactly once (steps discarded by a rollback are marked and
not counted), and leave no actor alive and no placement group behind (checked on the Ray it ran on, after the
run, with a bounded wait). Prints a table and writes `benchmarks/results/chaos_train.json`.

Runtime on 2 shared cores: about 1-3 minutes per run, so ~9 minutes for the default 3 seeds x 3 kinds (measured
544 s at load 11-17); `--quick` runs one seed of each kind, ~2-4 minutes.
"""

from __future__ import annotations

import argparse
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

from benchmarks._common import RESULTS, ROOT, local_ray, machine_info, write_json
from schemas.loader import dump_spec
from schemas.train import TrainSpec

STEPS, CHECKPOINT_EVERY, KILL_PROBABILITY = 24, 4, 0.03
RUN_TIMEOUT_S, LEAK_WAIT_S = 600.0, 60.0


def chaos_spec(output: str, seed: int, probability: float) -> TrainSpec:
    """A d=32, 4-layer, 4-stage CheckFree run into `output`, killing each stage with `probability` per step."""
    return TrainSpec.model_validate({
        "name": f"chaos-{seed}", "steps": STEPS, "eval_every": STEPS, "eval_batches": 1, "seed": seed,
        "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
        "pipeline": {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 2, "num_cpus_per_stage": 0.2,
                     "warm_standby": False},
        "optim": {"lr": 3e-3}, "recovery": {"strategy": "checkfree"},
        "checkpointing": {"every": CHECKPOINT_EVERY},
        "failures": {"probability_per_step": probability, "seed": seed}, "output": {"uri": output},
    })


def step_accounting(steps: list[int], rolled_back: list[bool] | None, expected: int) -> dict:
    """Kept steps (not discarded by a rollback) against 1..expected: those lost and those counted twice."""
    rolled_back = rolled_back or [False] * len(steps)
    kept = [step for step, gone in zip(steps, rolled_back) if not gone]
    return {"kept_steps": len(kept), "lost_steps": sorted(set(range(1, expected + 1)) - set(kept)),
            "counted_twice": sorted({s for s in kept if kept.count(s) > 1}),
            "extra_steps": sorted(set(kept) - set(range(1, expected + 1)))}


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
    return subprocess.Popen([sys.executable, "-m", "checkfree_ray", "train", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


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
    return {"finished": True, **step_accounting(result["steps"], result.get("rolled_back"), STEPS),
            "failures": len(result["failures"]), "rollbacks": sum(f["rolled_back_to"] is not None
                                                                for f in result["failures"]),
            "resumed_from": result.get("resumed_from") or []}


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
    while driver.poll() is None and not any((out / "checkpoints").glob(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = driver.poll() is None
    if killed:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    return {**_result(out, *_finish(_train(spec_path, env))), "driver_killed_after_checkpoint": at if killed else None}


def run_node_loss(seed: int) -> dict:
    """A worker node removed mid-run, in a fresh process with its own 3-node cluster."""
    with tempfile.TemporaryDirectory(prefix="chaos-node-") as out:
        done = subprocess.run([sys.executable, "-m", "tests.node_loss_demo", out, str(seed)], cwd=ROOT,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"finished": False, "error": (done.stderr or done.stdout)[-2000:]}
    report = json.loads(lines[-1].removeprefix("RESULT "))
    return {"finished": True, **step_accounting(report["steps"], report["rolled_back"], report["expected_steps"]),
            "failures": len(report["failures"]), "rollbacks": sum(f["rolled_back_to"] is not None
                                                                for f in report["failures"]),
            "leaked_actors": report["leaked_actors"], "leaked_placement_groups": report["leaked_placement_groups"]}


def passed(row: dict) -> bool:
    """A run passes when it finished with every step kept once and leaked nothing."""
    return bool(row.get("finished")) and not row["lost_steps"] and not row["counted_twice"] \
        and not row["extra_steps"] and row["leaked_actors"] == 0 and row["leaked_placement_groups"] == 0


def chaos(runs: int, kinds: tuple[str, ...] = ("stages", "driver", "node")) -> list[dict]:
    """Every kind of failure for seeds 0..runs-1; one row per run."""
    import ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="chaos-train-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if {"stages", "driver"} & set(kinds):
            stack.enter_context(local_ray(num_cpus=2))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if ray.is_initialized():
            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        for seed in range(runs):
            for kind in kinds:
                started = time.monotonic()
                if kind == "node":
                    row = run_node_loss(seed)
                else:
                    row = (run_stage_kills if kind == "stages" else run_driver_kill)(seed, work, env)
                    row.update(leaks())
                row.update(kind=kind, seed=seed, wall_s=round(time.monotonic() - started, 1))
                row["passed"] = passed(row)
                rows.append(row)
                print(_line(row), flush=True)
                if not row.get("finished"):
                    print(row.get("error", ""), flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['kind']:7s} seed {row['seed']:2d}  {'ok  ' if row['passed'] else 'FAIL'}  "
            f"failures {row.get('failures', '-'):>2}  rollbacks {row.get('rollbacks', '-'):>2}  "
            f"kept {row.get('kept_steps', '-'):>3}  lost {row.get('lost_steps', '-')}  "
            f"twice {row.get('counted_twice', '-')}  leaked actors/pgs {row.get('leaked_actors', '-')}/"
            f"{row.get('leaked_placement_groups', '-')}  {row['wall_s']:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="seeds per kind of failure")
    parser.add_argument("--quick", action="store_true", help="one seed per kind of failure (--runs 1)")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    rows = chaos(args.runs)
    summary = {kind: f"{sum(r['passed'] for r in rows if r['kind'] == kind)}/{args.runs}"
               for kind in ("stages", "driver", "node")}
    print("passed:", summary)
    write_json(RESULTS / "chaos_train.json", {
        "benchmark": "chaos_train", "runs_per_kind": args.runs, "steps": STEPS,
        "kill_probability_per_stage_step": KILL_PROBABILITY, "checkpoint_every": CHECKPOINT_EVERY,
        "passed": summary, "rows": rows, "machine": machine_info()})


if __name__ == "__main__":
    main()
