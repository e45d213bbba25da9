"""A drain of the node that holds both evaluators, while `pool.score()` runs a batch, costs no candidate.

Run as a script (`python -m tests.test_lcsc_corner_drain WORKDIR`, prints `RESULT <json>`), it starts its own
3-node local Ray (`ray.cluster_utils.Cluster`: a head without CPUs, node A of 1 CPU that takes both evaluators,
then node B of 1 CPU for their replacements), scores a batch of two candidates once without a drain, then again
while node A is drained with Ray's own call (a PREEMPTION drain, as `ray drain-node` sends). Each candidate's
sampler holds until the harness lets it go, so the events land at exact moments: both candidates in flight, the
drain, the candidate of the evaluator replaced second finishes (its evaluator is free but on the draining node),
then the evaluator replaced first is killed under its candidate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.lcsc_plugins import toy_sample

ROOT = Path(__file__).resolve().parents[1]
HOLD_S = 180.0  # a held sampler call gives up after this (a harness that died must not hang the evaluator)


def held_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str):
    """toy_sample; logs `pid seed` to log_dir/calls.log, then waits while log_dir/hold-<seed> exists (`seed`: the
    chunk's seed, `evaluator.chunk_seed(job seed, 0)` for a job of one chunk)."""
    with open(Path(log_dir) / "calls.log", "a") as handle:
        handle.write(f"{os.getpid()} {seed}\n")
    hold, deadline = Path(log_dir) / f"hold-{seed}", time.monotonic() + HOLD_S
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return toy_sample(model, n, seed, nfe, batch_size)


def running(log_dir: Path, seeds: list[int], since: int) -> dict[int, int]:
    """seed -> pid of the sampler calls logged after the first `since` lines, for `seeds`."""
    path = log_dir / "calls.log"
    lines = path.read_text().splitlines()[since:] if path.exists() else []
    return {int(seed): int(pid) for pid, seed in (line.split() for line in lines) if int(seed) in seeds}


def wait_for(condition, timeout_s: float, what: str) -> None:
    """Poll until `condition()`; an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drain(node_id: str, deadline_s: int) -> None:
    """A PREEMPTION drain of `node_id` with `deadline_s` left (what `ray drain-node` sends to the GCS)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot notice",
        int(time.time() * 1000) + deadline_s * 1000,
    )
    assert accepted, why


def drain_during_batch(pool, log_dir: Path, jobs: list, node_id: str, events: dict) -> None:
    """The harness beside `pool.score(jobs)`: both candidates in flight, drain, free evaluator 1, let the
    candidate replaced under evaluator 0 go once both evaluators were replaced."""
    from lcsc_ray.evaluator import chunk_seed

    seeds = [chunk_seed(job.seed, 0) for job in jobs]
    since = len((log_dir / "calls.log").read_text().splitlines())
    wait_for(lambda: len(running(log_dir, seeds, since)) == 2, 120, "both candidates in flight")
    on = running(log_dir, seeds, since)
    pids = pool.state()["pids"]
    first = next(seed for seed, pid in on.items() if pid == pids[0])  # on the evaluator replaced first
    second = next(seed for seed in seeds if seed != first)
    drain(node_id, deadline_s=120)
    events["drained_at"] = time.monotonic()
    (
        log_dir / f"hold-{second}"
    ).unlink()  # evaluator 1 finishes its candidate and is free, on the draining node
    try:
        wait_for(lambda: pool.state()["drained"] >= 2, 120, "both evaluators replaced")
    except AssertionError as exc:
        events["harness_error"] = str(exc)
    finally:
        (log_dir / f"hold-{first}").unlink()
    events.update(first=first, second=second, state=pool.state())


def main(workdir: Path) -> dict:
    """Start the cluster, score the batch without and with the drain; returns what it prints."""
    import ray
    from ray.cluster_utils import Cluster

    from lcsc_ray.draining import actor_nodes
    from lcsc_ray.evaluator import chunk_seed
    from lcsc_ray.pool import Job
    from rayops.session import apply_local_ray_env
    from tests.test_lcsc_pool import SAMPLES, pool_spec, start_pool

    apply_local_ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node_a = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    events: dict = {}
    try:
        spec = pool_spec(workdir, "tests.test_lcsc_corner_drain:held_sample", log=True)
        log_dir = workdir / "log"
        jobs = [Job.of([0.1, 0.2, 0.7], SAMPLES, 1), Job.of([0.3, 0.3, 0.4], SAMPLES, 2)]
        pool = start_pool(spec)
        try:
            events["twin"] = pool.score(jobs)
            cluster.add_node(
                num_cpus=1
            )  # room for the replacements, added once both evaluators sit on node A
            cluster.wait_for_nodes()
            evaluators = ray.get(pool.service.evaluators.remote(), timeout=60)
            events["nodes_before"] = actor_nodes(evaluators)
            for job in jobs:
                (log_dir / f"hold-{chunk_seed(job.seed, 0)}").touch()
            harness = threading.Thread(
                target=drain_during_batch, args=(pool, log_dir, jobs, node_a.node_id, events)
            )
            harness.start()
            events["drained"] = pool.score(jobs)
            harness.join(timeout=180)
            events["nodes_after"] = actor_nodes(ray.get(pool.service.evaluators.remote(), timeout=60))
        finally:
            pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    events.pop("drained_at", None)
    return {**events, "node_a": node_a.node_id}


@pytest.mark.timeout(400)
def test_a_drain_under_two_busy_evaluators_costs_no_candidate(tmp_path):
    """Both evaluators on node A, a candidate in flight on each, node A drained: every score of `pool.score()` is
    finite and equals its no-drain twin; both evaluators were replaced off node A, none counted as a failure."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_lcsc_corner_drain", str(tmp_path)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (proc.stdout[-2000:], proc.stderr[-4000:])
    report = json.loads(line[len("RESULT ") :])
    assert "harness_error" not in report, (report, proc.stderr[-4000:])
    assert report["nodes_before"] == [report["node_a"]] * 2  # both evaluators on the node that drains
    assert [r["status"] for r in report["drained"]] == ["ok", "ok"]
    assert [r["fid"] for r in report["drained"]] == [r["fid"] for r in report["twin"]]
    assert all(r["fid"] < float("inf") for r in report["drained"])
    state = report["state"]
    assert (state["drained"], state["replacements"], state["stopped"]) == (2, 0, None)
    assert report["node_a"] not in report["nodes_after"]


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))), flush=True)
    sys.exit(0)
