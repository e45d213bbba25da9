"""Spot rehearsal, LCSC half: seeded searches on the local autoscaling spot cluster with seeded spot events,
each against a twin on a fixed cluster of the same peak size.

Each run submits the same small search (5 tiny checkpoints, 64-sample FIDs, 3 evaluators of 1 CPU, `--budget`
evaluations, each sampling at least `--eval-s`) through Ray's Job Submission SDK, as `ray job submit` does:
- to a `rayops.spot_cluster.LocalSpotCluster` (3 spot workers of 1 CPU at most, launched on demand), while a
  `rayops.spot_events.SpotEventInjector` plays `plan_spot_events(seed, --events, ...)`: reclaims without notice
  and PREEMPTION drains with a `--notice-s` deadline;
- to a fixed local cluster of 3 one-CPU workers (`tests/multinode.py`), the twin.
Per run the JSON records: the budget kept (exactly `budget` trials, distinct, none failed), the same winner as the
twin, evaluations redone (sampler calls beyond the distinct evaluations), the time from each node loss until the
pool was whole again (from the result's `cluster_timeline`), worker node-seconds against the twin's, and what was
left after the job: worker nodes once the idle timeout passed, and the job's actors still alive. Run from the
repository root:

    .venv/bin/python benchmarks/spot_rehearsal.py [--quick] [--runs N] [--events E]

It writes benchmarks/results/spot_rehearsal.json (--quick: one run, outputs/bench/quick/).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import QUICK_RESULTS, RESULTS, ROOT, machine_info, write_json
from lcsc_ray.report import load_result
from rayops.cluster_nodes import alive_node_ids, autoscaler_nodes, wait_until, worker_nodes
from rayops.spot_cluster import LocalSpotCluster
from rayops.spot_events import SpotEventInjector, plan_spot_events
from schemas.loader import dump_spec
from schemas.search import SearchSpec

EVALUATORS = 3  # one per 1-CPU worker; the spot cluster's peak and the twin's fixed size
JOB_TIMEOUT_S = 1800.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def search_spec(workdir: Path, budget: int, eval_s: float, seed: int) -> SearchSpec:
    """The run's search: tiny plug-ins from tests/, a sampler that logs each call and takes `eval_s`."""
    from tests.test_lcsc_search import tiny_spec

    (workdir / "log").mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(
        workdir,
        budget=budget,
        sampler={
            "target": "tests.lcsc_search_plugins:counting_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(workdir / "log"), "seconds": eval_s},
        },
    )
    spec.seed = seed
    spec.evaluators = spec.evaluators.model_copy(update={"num_actors": EVALUATORS, "num_cpus": 1.0})
    return spec


def submit_and_wait(dashboard_url: str, spec: SearchSpec, job_dir: Path, stop: threading.Event) -> dict:
    """Submit the search as a Ray job, wait for it to end; returns its status, logs and wall time."""
    from ray.job_submission import JobSubmissionClient

    job_dir.mkdir(parents=True, exist_ok=True)
    dump_spec(spec, job_dir / "spec.yaml")
    client = JobSubmissionClient(dashboard_url)
    began = time.monotonic()
    job_id = client.submit_job(
        entrypoint=f"python -m lcsc_ray search {job_dir / 'spec.yaml'}",
        # no working_dir: on the local cluster every node shares one session dir, and a node's runtime-env agent
        # deletes an unused working_dir package that the job's driver still runs in
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        wait_until(lambda: str(client.get_job_status(job_id)) in TERMINAL, JOB_TIMEOUT_S, "the search job")
    finally:
        stop.set()
        if str(client.get_job_status(job_id)) not in TERMINAL:
            client.stop_job(job_id)
    return {
        "status": str(client.get_job_status(job_id)),
        "wall_s": time.monotonic() - began,
        "logs": client.get_job_logs(job_id),
    }


def sampler_calls(workdir: Path) -> int:
    """Sampler calls of the run (each evaluation attempt samples once: 64 samples in one chunk)."""
    path = workdir / "log" / "calls.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def search_facts(spec: SearchSpec, workdir: Path, budget: int) -> dict:
    """What the finished search recorded: budget kept, the winner, evaluations and sampler calls."""
    result = load_result(spec.output.uri)
    timeline = result.cluster_timeline or {}
    distinct = timeline["samples"][-1]["done"] if timeline.get("samples") else None
    return {
        "num_evaluations": result.num_evaluations,
        "num_failed": result.num_failed,
        "budget_kept": result.num_evaluations == budget and result.num_failed == 0,
        "winner": [round(a, 12) for a in result.best.coefficients],
        "winner_fid": result.best.fid,
        "sampler_calls": sampler_calls(workdir),
        "distinct_evaluations": distinct,
        "timeline": timeline,
    }


def whole_again_s(timeline: dict) -> list[float | None]:
    """Seconds from each worker-node loss (a leave, or a drain) until the pool was back at its peak size."""
    samples = timeline.get("samples", [])
    peak = max((sample["workers"] for sample in samples), default=0)
    losses = [e["t_s"] for e in timeline.get("events", []) if e["kind"] in ("drain", "leave")]
    out = []
    for at in losses:
        later = [s["t_s"] for s in samples if s["t_s"] > at and s["workers"] == peak]
        out.append(round(later[0] - at, 1) if later else None)
    return out


def worker_node_seconds(timeline: dict, end_s: float) -> float:
    """Worker nodes (every type but the head) integrated over the job's time, from the timeline's samples."""
    samples = timeline.get("samples", [])
    total = 0.0
    for sample, following in zip(samples, [*samples[1:], None]):
        until = following["t_s"] if following else end_s
        workers = sum(n for node_type, n in sample["nodes"].items() if "head" not in node_type)
        total += workers * max(0.0, until - sample["t_s"])
    return round(total, 1)


def spot_run(seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One search on the local spot cluster with the seeded events; then its scale-back and leaks."""
    with LocalSpotCluster(max_workers=EVALUATORS, idle_timeout_s=args.idle_timeout_s) as cluster:
        gcs = cluster.address.gcs_address
        head = {node.node_id for node in autoscaler_nodes(gcs) if node.is_head}
        spec = search_spec(workdir, args.budget, args.eval_s, seed)
        injector = SpotEventInjector(gcs, cluster.temp_dir)
        stop = threading.Event()

        def chaos() -> None:  # the events start once the pool has its first worker
            try:
                wait_until(lambda: worker_nodes(gcs), 600, "a first spot worker")
            except TimeoutError:
                return
            injector.run(plan_spot_events(seed, args.events, args.window_s, args.notice_s), stop)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        job = submit_and_wait(cluster.address.dashboard_url, spec, workdir / "job", stop)
        thread.join(timeout=60)
        injector.cancel()
        began = time.monotonic()
        try:
            wait_until(lambda: alive_node_ids(gcs) == head, 600, "the cluster to scale back to its head")
            scale_back_s = round(time.monotonic() - began, 1)
        except TimeoutError:
            scale_back_s = None
        facts = search_facts(spec, workdir, args.budget) if job["status"] == "SUCCEEDED" else {}
        return {
            "job_status": job["status"],
            "wall_s": round(job["wall_s"], 1),
            "events": injector.timeline(),
            "not_counted_node_losses": job["logs"].count("lost with its node"),
            "counted_replacements": job["logs"].count("; replacement "),  # healing's log line per counted one
            "scale_back_s": scale_back_s,
            "leaked_worker_nodes": len(alive_node_ids(gcs) - head),
            **facts,
        }


def twin_run(seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    """The same search on a fixed cluster of the spot cluster's peak size (3 workers of 1 CPU), no events."""
    from tests.multinode import local_cluster

    (workdir / "ray-logs").mkdir(parents=True, exist_ok=True)
    with local_cluster([1.0] * EVALUATORS, head_cpus=0, log_dir=workdir / "ray-logs") as cluster:
        cluster.wait_for_nodes(EVALUATORS + 1)
        spec = search_spec(workdir, args.budget, args.eval_s, seed)
        job = submit_and_wait(cluster.dashboard_url, spec, workdir / "job", threading.Event())
    facts = search_facts(spec, workdir, args.budget) if job["status"] == "SUCCEEDED" else {}
    return {"job_status": job["status"], "wall_s": round(job["wall_s"], 1), **facts}


def compare(seed: int, spot: dict, twin: dict) -> dict:
    """One row of the JSON: the spot run against its twin."""
    timeline = spot.pop("timeline", {})
    twin.pop("timeline", None)
    node_s = worker_node_seconds(timeline, spot["wall_s"])
    twin_node_s = EVALUATORS * twin["wall_s"] if "wall_s" in twin else 0.0
    return {
        "seed": seed,
        "budget_kept": bool(spot.get("budget_kept")),
        "same_winner_as_twin": spot.get("winner") is not None and spot.get("winner") == twin.get("winner"),
        "evaluations_redone": (
            spot["sampler_calls"] - spot["distinct_evaluations"] if spot.get("distinct_evaluations") else None
        ),
        "whole_again_s": whole_again_s(timeline),
        "worker_node_s": node_s,
        "twin_worker_node_s": round(twin_node_s, 1) if twin_node_s else None,
        "node_s_vs_twin": round(node_s / twin_node_s, 3) if twin_node_s else None,
        "spot": spot,
        "twin": twin,
        "cluster_timeline": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rehearsals and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--events", type=int, default=3, help="spot events per run (both kinds)")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument(
        "--eval-s", type=float, default=3.0, help="each evaluation samples at least this long"
    )
    parser.add_argument("--window-s", type=float, default=90.0, help="events fall in this window")
    parser.add_argument("--notice-s", type=float, default=20.0, help="a drain's deadline")
    parser.add_argument("--idle-timeout-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="runs use seeds seed, seed+1, ...")
    parser.add_argument("--quick", action="store_true", help="one run, written under outputs/bench/quick/")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    rows = []
    for seed in range(args.seed, args.seed + runs):
        with tempfile.TemporaryDirectory(prefix="spot-rehearsal-") as tmp:
            spot = spot_run(seed, args, Path(tmp) / "spot")
            try:
                twin = twin_run(seed, args, Path(tmp) / "twin")
            except Exception as exc:  # noqa: BLE001 - a twin whose cluster did not start: recorded, the run kept
                twin = {"job_status": "NOT_RUN", "error": f"{type(exc).__name__}: {exc}"}
        rows.append(compare(seed, spot, twin))
        print(
            f"seed {seed}: budget kept {rows[-1]['budget_kept']}, same winner {rows[-1]['same_winner_as_twin']}, "
            f"redone {rows[-1]['evaluations_redone']}, whole again {rows[-1]['whole_again_s']} s, "
            f"node-s {rows[-1]['node_s_vs_twin']} x twin",
            flush=True,
        )
    out = (QUICK_RESULTS if args.quick else RESULTS) / "spot_rehearsal.json"
    write_json(out, {"machine": machine_info(), "args": vars(args), "lcsc": rows})
    print(f"wrote {out}")
    return 0 if all(row["budget_kept"] and row["same_winner_as_twin"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
