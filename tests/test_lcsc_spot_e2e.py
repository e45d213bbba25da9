"""End to end on the local autoscaling spot cluster: an LCSC search submitted through Ray's Job Submission SDK
(as `ray job submit` does) rides out a reclaim without notice and a PREEMPTION drain with a deadline: the budget
is kept exactly, nothing is counted as a replacement, the pool grows and shrinks with the nodes, the result's
timeline holds the events, and the cluster shrinks back to its head afterwards."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from lcsc_ray.report import load_result
from rayops import artifacts
from rayops.cluster_nodes import alive_node_ids, autoscaler_nodes, wait_until, worker_nodes
from rayops.spot_events import DRAIN, RECLAIM, TERMINATE, PlannedEvent, SpotEventInjector
from schemas.loader import dump_spec
from tests.spot_cluster_fixtures import ROOT  # spot_cluster: registered by tests/conftest.py
from tests.test_lcsc_search import tiny_spec

BUDGET = 40
EVAL_S = 3.0  # each evaluation samples this long at least: the events hit a busy pool
NOTICE_S = 20
EVALUATORS = 3  # one per 1-CPU spot worker: the cluster's 3 workers at most


def _calls(log_dir) -> int:
    path = log_dir / "calls.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _workers_up(gcs: str, count: int):
    workers = worker_nodes(gcs)
    return workers if len(workers) >= count else None


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_search_on_the_spot_cluster_rides_out_a_reclaim_and_a_drain(spot_cluster, tmp_path):
    gcs = spot_cluster.address.gcs_address
    head_id = next(node.node_id for node in autoscaler_nodes(gcs) if node.is_head)
    (tmp_path / "log").mkdir()
    spec = tiny_spec(
        tmp_path,
        budget=BUDGET,
        sampler={
            "target": "tests.lcsc_search_plugins:counting_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(tmp_path / "log"), "seconds": EVAL_S},
        },
    )
    spec.evaluators = spec.evaluators.model_copy(
        update={"num_actors": EVALUATORS, "min_actors": 1, "num_cpus": 1.0, "max_replacements": 3}
    )
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    dump_spec(spec, job_dir / "spec.yaml")
    client = JobSubmissionClient(spot_cluster.address.dashboard_url)
    job_id = client.submit_job(
        entrypoint=f"python -m lcsc_ray search {job_dir / 'spec.yaml'}",
        # no working_dir: on the local cluster every node shares one session dir, and a node's runtime-env agent
        # deletes an unused working_dir package that the job's driver still runs in
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    injector = SpotEventInjector(gcs, spot_cluster.temp_dir)
    try:
        # the pool's pending evaluators make the autoscaler launch a worker each; the search runs on them
        wait_until(lambda: _workers_up(gcs, EVALUATORS), 300, f"{EVALUATORS} spot workers")
        wait_until(lambda: _calls(tmp_path / "log") >= 8, 300, "the search to be under way")
        events = injector.run([PlannedEvent(0.0, RECLAIM, 0.0, 0.0), PlannedEvent(6.0, DRAIN, NOTICE_S, 0.0)])
        assert [event.kind for event in events] == [RECLAIM, DRAIN], injector.timeline()
        reclaimed, drained = events
        wait_until(
            lambda: (
                client.get_job_status(job_id) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
            ),
            900,
            "the search job to end",
        )
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
        injector.wait_for_terminations(NOTICE_S + 60)
    except BaseException:
        print(
            f"job {client.get_job_status(job_id)}; the end of its logs:\n{client.get_job_logs(job_id)[-6000:]}"
        )
        raise
    finally:
        injector.cancel()
        if client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            client.stop_job(job_id)

    # the budget exactly, each candidate once, none failed
    result = load_result(spec.output.uri)
    assert result.num_evaluations == BUDGET and result.num_failed == 0
    out = spec.output.uri
    manifest = artifacts.read_manifest(out)
    (tmp_path / "trials.parquet").write_bytes(artifacts.read_artifact_file(out, "trials.parquet", manifest))
    trials = pd.read_parquet(tmp_path / "trials.parquet")
    search = trials[trials.rung == 0]
    assert len(search) == BUDGET and (search.status == "ok").all()
    assert len({tuple(a) for a in search.coefficients}) == BUDGET
    # both events were routine: the reclaimed evaluator was lost with its node, and no replacement counted against
    # `max_replacements` names either node (a crowded machine may crash an evaluator on its own: that one counts)
    lines = logs.splitlines()
    assert any(f"lost with its node on node {reclaimed.node_id}" in line for line in lines), logs[-4000:]
    counted = [line for line in lines if "; replacement " in line]
    assert not [line for line in counted if reclaimed.node_id in line or drained.node_id in line]
    assert [event.kind for event in injector.events if event.kind == TERMINATE] == [TERMINATE]

    # the timeline: the events, and a pool that grew to 3, shrank, and grew again
    timeline = result.cluster_timeline
    assert timeline is not None
    kinds = {(event["kind"], event.get("node_id")) for event in timeline["events"]}
    assert ("drain", drained.node_id) in kinds and ("leave", drained.node_id) in kinds
    assert ("leave", reclaimed.node_id) in kinds
    assert (
        sum(event["kind"] == "join" for event in timeline["events"]) >= EVALUATORS + 1
    )  # one launched again
    workers = [sample["workers"] for sample in timeline["samples"]]
    peak = workers.index(EVALUATORS)
    dip = next(i for i in range(peak, len(workers)) if workers[i] < EVALUATORS)
    assert EVALUATORS in workers[dip:], workers  # it grew again after the loss
    dones = [sample["done"] for sample in timeline["samples"]]
    assert dones == sorted(dones) and dones[-1] >= BUDGET
    assert artifacts.read_artifact_file(out, "cluster_timeline.png", manifest).startswith(b"\x89PNG")

    # idle again, the cluster shrinks back to its head
    wait_until(
        lambda: alive_node_ids(gcs) == {head_id} and not worker_nodes(gcs),
        300,
        "the cluster to shrink to its head",
    )
