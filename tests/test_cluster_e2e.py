"""Jobs on a real multi-node Ray on loopback: `ray job submit` a search, lose a worker node mid-run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from schemas.loader import dump_spec
from tests.multinode import local_cluster
from tests.test_lcsc_search import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """A head and two 1-CPU worker nodes (resources `worker0`, `worker1`), started once for this module's tests."""
    with local_cluster(
        worker_cpus=[1, 1], head_cpus=1, log_dir=tmp_path_factory.mktemp("cluster")
    ) as cluster:
        yield cluster


@pytest.fixture
def cluster(three_nodes):
    """The module's cluster with both worker nodes alive: a node an earlier test killed is replaced first."""
    three_nodes.restore_workers()
    return three_nodes


def _finished(out: Path) -> int:
    return len(list((out / "state" / "evaluations").glob("*.json")))


# `extended`: a search submitted as a Ray job losing a worker node mid-run is, in `make test`,
# test_lcsc_spot_e2e.py (a reclaim and a drain on the autoscaling cluster); this variant adds `--working-dir`.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
def test_ray_job_submit_search_survives_lost_worker_node(cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m lcsc_ray search` on 3 nodes; a worker node is removed
    mid-search; no completed trial is lost and the budget is finished."""
    # each sampler call takes at least 1 s, as a real one does: 14 trials on 2 evaluators then last over 7 s, so
    # the harness (polling every 0.5 s, on crowded cores too) kills the node with trials still to run
    sampler = {
        "target": "tests.lcsc_search_plugins:counting_sample",
        "nfe": 2,
        "kwargs": {"log_dir": str(tmp_path), "seconds": 1.0},
    }
    spec = tiny_spec(tmp_path, budget=14, sampler=sampler)
    spec = spec.model_copy(update={"evaluators": spec.evaluators.model_copy(update={"num_cpus": 1.0})})
    spec_path = tmp_path / "spec.yaml"
    dump_spec(spec, spec_path)
    address = cluster.dashboard_url
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--no-wait",
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "lcsc_ray",
        "search",
        str(spec_path),
    ]
    for _attempt in range(30):  # the head's job agent takes a few seconds to come up
        submit = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = next(
        line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line
    )
    client = JobSubmissionClient(address)
    tune_dir = tmp_path / "out"
    deadline = time.monotonic() + 300
    while _finished(tune_dir) < 6 and time.monotonic() < deadline:
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    done_before = _finished(tune_dir)
    cluster.kill_node(cluster.worker("worker0"))  # a worker node disappears at once, like a spot preemption
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline + 200:
        time.sleep(1)
    status, logs = client.get_job_status(job_id), client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert 6 <= done_before < 14
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials[trials.rung == 0]) == 14
    # only trials in flight when the node died (one per evaluator) may fail, each recorded with its reason
    failed = trials[trials.status == "failed"]
    assert len(failed) <= spec.evaluators.num_actors and all(failed.reason.str.len() > 0)


# `extended` (`make test-extended`): a training run losing a worker node mid-run (lost stages rebuilt, every
# step kept once, each loss recorded, nothing leaked) is, in `make test`, test_checkfree_spot_e2e.py; training
# submitted as a Ray job to a head that runs it to SUCCEEDED is test_checkfree_sdk.py::
# test_submit_training_to_local_head.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
def test_training_job_recovers_stages_of_a_lost_worker_node(cluster, tmp_path):
    STEPS = 400  # long enough (tens of seconds) that the node is killed while the job runs
    """A CheckFree training job spread over 3 nodes loses a worker node mid-run and still finishes every step
    (lost stages rebuilt, or rolled back to the checkpoint when neighbours died together)."""
    import json
    import re

    from schemas.train import TrainSpec

    spec = TrainSpec.model_validate(
        {
            "steps": STEPS,
            "eval_every": 100,
            "eval_batches": 1,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 32},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 4,
                "num_cpus_per_stage": 0.25,
                "warm_standby": False,
            },  # every StageWorker actor is then a pipeline stage
            "recovery": {"strategy": "checkfree"},
            "checkpointing": {"every": 4},
            "output": {"uri": str(tmp_path / "train-out")},
        }
    )
    spec_path = tmp_path / "train.yaml"
    dump_spec(spec, spec_path)
    client = JobSubmissionClient(cluster.dashboard_url)
    for _attempt in range(30):
        try:
            job_id = client.submit_job(entrypoint=f"python -m checkfree_ray train {spec_path}")
            break
        except RuntimeError as exc:  # the head's job agent is still starting
            assert "No available agent" in str(exc)
            time.sleep(2)
    deadline = time.monotonic() + 300
    step = 0
    while step < 6 and time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        assert not status.is_terminal(), client.get_job_logs(job_id)[-3000:]
        steps = re.findall(rf"train\[checkfree\] (\d+)/{STEPS}", client.get_job_logs(job_id))
        step = int(steps[-1]) if steps else 0
        time.sleep(0.5)
    # the worker node hosting the most stages disappears with them (abruptly, as a spot preemption would)
    stage_nodes = cluster.actor_nodes("StageWorker")
    workers = cluster.node_ids()
    hosted = {name: stage_nodes.count(node_id) for name, node_id in workers.items()}
    victim = max(hosted, key=hosted.get)
    assert not client.get_job_status(job_id).is_terminal(), "the job ended before a node could be killed"
    assert hosted[victim] >= 1, f"no stage on a worker node: workers {workers}, actors {cluster.actors()}"
    cluster.kill_node(cluster.worker(victim))
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline + 200:
        time.sleep(1)
    status, logs = client.get_job_status(job_id), client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    result = json.loads((tmp_path / "train-out" / "result.json").read_text())
    assert result["steps"][-1] == STEPS
    # every stage on the lost node is recorded as a failure with its recovery
    assert len(result["failures"]) >= hosted[victim], result["failures"]
    assert all(f["method"] and f["recovery_s"] >= 0 for f in result["failures"])
