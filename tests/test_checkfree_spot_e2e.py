"""CheckFree on a real local autoscaling spot cluster, submitted with `ray job submit` as users do: the stages ask
for spot workers (the autoscaler launches them), one stage's node is reclaimed without notice (CheckFree rebuilds
the stage), another gets a PREEMPTION drain with a deadline (its stage is handed off before it), the run ends with
exactly its steps, leaves no actor or placement group, and the cluster shrinks back to its head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayops.cluster_nodes import alive_node_ids, autoscaler_nodes, wait_until, worker_nodes
from rayops.local_head import RAY_CLI
from rayops.rehearsal_config import MARKET_LABEL, SPOT
from rayops.resources import AUTOSCALING_ENV
from rayops.spot_events import DRAIN, RECLAIM, TERMINATE, SpotEventInjector
from schemas.loader import dump_spec, load_spec
from schemas.train import TrainSpec
from schemas.train_result import TrainResult
from tests.spot_cluster_fixtures import ROOT, driver_env  # spot_cluster: registered by tests/conftest.py

STEPS = 1500  # ~8 steps/s on loaded cores: minutes, so the run outlasts both events
CHECKPOINT_EVERY = 20
NOTICE_S = 45  # the drain's deadline: room for a hand-off to a node launched for it (~20 s on loaded cores)
STAGE_CLASSES = ("StageWorker", "DirectStageWorker")  # the actor classes of `StageActor`, `DirectStageActor`


def _ray_cli(*args: str, timeout: float = 300) -> str:
    out = subprocess.run(
        [RAY_CLI, *args],
        env=driver_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _stage_actors(dashboard: str) -> list[dict]:
    """The alive stage actors (and standbys) of the cluster (state API on the dashboard): actor id and node id."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard, limit=10000, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
    )
    return [{"id": a.actor_id, "node_id": a.node_id} for a in actors if a.class_name in STAGE_CLASSES]


def _stages_by_node(dashboard: str, exclude: set[str]) -> dict[str, int]:
    """{node id: alive actors there that hold a stage} (they have run forwards; a standby has not), nodes in
    `exclude` left out."""
    from ray.util.state import list_tasks

    alive = {a["id"]: a["node_id"] for a in _stage_actors(dashboard)}
    tasks = list_tasks(
        address=dashboard,
        limit=10000,
        filters=[("name", "=", f"{STAGE_CLASSES[0]}.forward")],
        raise_on_missing_output=False,
    )
    counts: dict[str, int] = {}
    for actor in {t.actor_id for t in tasks} & set(alive):
        if alive[actor] not in exclude:
            counts[alive[actor]] = counts.get(alive[actor], 0) + 1
    return counts


def _live_placement_groups(dashboard: str) -> list[str]:
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=dashboard, limit=10000, raise_on_missing_output=False)
    return [g.placement_group_id for g in groups if g.state != "REMOVED"]


def _newest_checkpoint(out: Path) -> int:
    steps = [
        int(p.parent.name.split("_")[-1]) for p in out.glob("checkpoints/run-*/checkpoint_*/MANIFEST.json")
    ]
    return max(steps, default=-1)


def _checkpoint_past(out: Path, step: int, jobs, job_id: str) -> int | None:
    """The newest checkpoint step when past `step`, else None; fails at once when the job has ended."""
    newest = _newest_checkpoint(out)
    if newest > step:
        return newest
    _still_running(jobs, job_id)
    return None


def _still_running(jobs, job_id: str) -> None:
    from ray.job_submission import JobStatus

    status = jobs.get_job_status(job_id)
    if status not in (JobStatus.RUNNING, JobStatus.PENDING):
        pytest.fail(f"the job is {status} already:\n{jobs.get_job_logs(job_id)[-5000:]}")


def _log_has(jobs, job_id: str, text: str) -> bool:
    """Whether the job's log holds `text`; fails at once when the job has ended."""
    if text in jobs.get_job_logs(job_id):
        return True
    _still_running(jobs, job_id)
    return False


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_checkfree_job_on_spot_nodes_survives_a_reclaim_and_a_drain(spot_cluster, tmp_path):
    gcs, dashboard = spot_cluster.address.gcs_address, spot_cluster.address.dashboard_url
    head_id = next(node.node_id for node in autoscaler_nodes(gcs) if node.is_head)
    out = tmp_path / "out"
    spec = load_spec(ROOT / "examples" / "train_spot.yaml", TrainSpec)
    spec = spec.model_copy(
        update={
            "steps": STEPS,
            "eval_every": STEPS,
            "checkpointing": spec.checkpointing.model_copy(update={"every": CHECKPOINT_EVERY}),
            "output": spec.output.model_copy(update={"uri": str(out)}),
        }
    )
    dump_spec(spec, tmp_path / "spec.yaml")
    # No --working-dir: the rehearsal's nodes share one temp dir, where a node's runtime-env cleanup can remove
    # the unpacked working dir under a running driver. LCSC_CLUSTER_AUTOSCALES: Ray's autoscaler v2 leaves no
    # trace that `rayops.resources` can read yet.
    env_vars = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", AUTOSCALING_ENV: "1"}
    runtime_env = {"env_vars": env_vars}
    submitted = _ray_cli(
        "job", "submit", "--address", dashboard, "--no-wait",
        "--runtime-env-json", json.dumps(runtime_env),
        "--", sys.executable, "-m", "checkfree_ray", "train", str(tmp_path / "spec.yaml"),
    )  # fmt: skip
    job_id = next(
        word.strip("'\"") for word in submitted.split() if word.strip("'\"").startswith("raysubmit_")
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(dashboard)
    injector = SpotEventInjector(gcs, spot_cluster.temp_dir)
    try:
        # The stages run on spot workers launched for them, and the run has passed its first checkpoint.
        wait_until(lambda: _checkpoint_past(out, 0, jobs, job_id), 900, "the run's first checkpoint")
        workers = {node.node_id: node for node in worker_nodes(gcs)}
        assert workers and all(node.labels.get(MARKET_LABEL) == SPOT for node in workers.values())
        stages = _stage_actors(dashboard)
        assert len(stages) == 5 and all(
            actor["node_id"] in workers for actor in stages
        )  # 4 stages, 1 standby

        # Reclaim (no notice) a node holding the fewest stages; once CheckFree rebuilt them, drain another.
        by_node = _stages_by_node(dashboard, exclude=set())
        reclaimed_id = min(by_node, key=lambda node: (by_node[node], node))
        reclaimed = injector.reclaim(workers[reclaimed_id])
        wait_until(lambda: _log_has(jobs, job_id, "failure: stage"), 600, "the lost stage's rebuild")

        by_node = _stages_by_node(dashboard, exclude={reclaimed_id})
        drained_id = min(by_node, key=lambda node: (by_node[node], node))
        drain_node = next(node for node in worker_nodes(gcs) if node.node_id == drained_id)
        drained = injector.drain(drain_node, NOTICE_S)
        wait_until(lambda: _log_has(jobs, job_id, "-> handoff"), 2 * NOTICE_S, "the drained stage's hand-off")

        # The reclaimed node's placement-group bundles, pending again, are the demand the autoscaler launches a
        # spot worker for.
        wait_until(
            lambda: {node.node_id for node in worker_nodes(gcs)} - set(workers) - {reclaimed_id},
            600,
            "a spot worker launched for the pending bundles",
        )
        injector.wait_for_terminations(NOTICE_S + 120)
        status = wait_until(
            lambda: (s := jobs.get_job_status(job_id)).is_terminal() and s, 1200, "the training job to end"
        )
        assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-5000:]
    finally:
        injector.cancel()
        if not jobs.get_job_status(job_id).is_terminal():
            jobs.stop_job(job_id)

    result = TrainResult.model_validate_json((out / "result.json").read_text())
    kept = [step for step, gone in zip(result.steps, result.rolled_back) if not gone]
    assert kept == list(range(1, STEPS + 1))  # every step exactly once

    # The reclaimed node's stage(s) were rebuilt by CheckFree(+), not rolled back; the drained one handed off.
    events = result.node_events
    lost = [e for e in events if e["kind"] == "stage_lost" and e["node_id"] == reclaimed.node_id]
    assert lost, events
    rebuilt = [e for e in events if e["kind"] == "stage_rebuilt" and e["stage"] in {e["stage"] for e in lost}]
    assert rebuilt and all(e["method"] in ("copy", "checkfree") for e in rebuilt), events
    assert all(e["node_id"] != reclaimed.node_id and e["whole_after_s"] > 0 for e in rebuilt)
    handoffs = [e for e in events if e["kind"] == "handoff" and e["from_node_id"] == drained.node_id]
    assert handoffs and all(e["before_deadline_s"] > 0 for e in handoffs), events
    assert any(e["kind"] == "drain_notice" and e["node_id"] == drained.node_id for e in events)
    methods = {(f.method, f.reason) for f in result.failures}
    assert ("handoff", "drain") in methods and methods & {("copy", "died"), ("checkfree", "died")}, methods
    assert [e["kind"] for e in injector.timeline()] == [RECLAIM, DRAIN, TERMINATE]
    # The run's cluster timeline saw the reclaimed node leave and the drain, and drew them.
    timeline = result.cluster_timeline
    assert timeline is not None and (out / "cluster_timeline.png").exists()
    seen = {(e["kind"], e["node_id"]) for e in timeline["events"]}
    assert ("leave", reclaimed.node_id) in seen and ("drain", drained.node_id) in seen, timeline["events"]
    assert timeline["workers_label"] == "stages alive" and timeline["samples"][-1]["done"] == STEPS

    # Nothing leaked, and idle, the cluster shrinks back to its head.
    wait_until(lambda: not _stage_actors(dashboard), 120, "no stage actor left alive")
    wait_until(lambda: not _live_placement_groups(dashboard), 120, "no placement group left")
    wait_until(
        lambda: alive_node_ids(gcs) == {head_id} and not worker_nodes(gcs),
        300,
        "the cluster to shrink back to its head",
    )
    assert os.path.exists(out / "hf")
