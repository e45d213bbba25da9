"""cluster/kuberay-rayjob.yaml as the in-tree autoscaler sees it: each RayJob's RayCluster spec goes through Ray's
own KubeRay converter (`_derive_autoscaling_config_from_ray_cr`, what the autoscaler runs on the live CR), and
the node types, worker bounds, resources and labels it derives are checked against the specs and against
cluster/aws-spot.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayops.rehearsal_config import MARKET_LABEL, load_aws_config
from schemas import SearchSpec, TrainSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
KUBERAY_YAML = ROOT / "cluster" / "kuberay-rayjob.yaml"
GIB = 1024**3
DOCS = [doc for doc in yaml.safe_load_all(KUBERAY_YAML.read_text()) if doc]
JOBS = {doc["metadata"]["name"]: doc for doc in DOCS if doc["kind"] == "RayJob"}
SPECS = {
    doc["metadata"]["name"]: next(iter(doc["data"].values())) for doc in DOCS if doc["kind"] == "ConfigMap"
}
JOB_SPEC = {"lcsc-search": "lcsc-search-spec", "checkfree-train": "checkfree-train-spec"}


def _autoscaling_config(job_name: str) -> dict:
    """What Ray's KubeRay autoscaler derives from the job's RayCluster (the CR KubeRay makes from the RayJob)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": job_name, "namespace": "lcsc"},
        "spec": JOBS[job_name]["spec"]["rayClusterSpec"],
    }
    return _derive_autoscaling_config_from_ray_cr(ray_cr)


def test_both_rayjobs_are_converted():
    """The YAML holds exactly the two RayJobs this test converts."""
    assert set(JOBS) == set(JOB_SPEC)


@pytest.mark.parametrize("job_name", sorted(JOB_SPEC))
def test_converter_sees_an_on_demand_head_that_takes_no_workers(job_name):
    """The head group becomes `headgroup`: 2 CPUs, 16 GiB, `on_demand: 1`, labelled on-demand, 0 workers."""
    head = _autoscaling_config(job_name)["available_node_types"]["headgroup"]
    assert head["resources"] == {"CPU": 2, "memory": 16 * GIB, "on_demand": 1}
    assert head["labels"] == {MARKET_LABEL: "on-demand"}
    assert (head["min_workers"], head["max_workers"]) == (0, 0)


@pytest.mark.parametrize("job_name", sorted(JOB_SPEC))
def test_converter_sees_a_spot_worker_group_with_its_bounds(job_name):
    """`cpu-spot` becomes a node type of 8 CPUs, 32 GiB, `spot: 1`, labelled spot, 0..6 workers; 5 min idle."""
    config = _autoscaling_config(job_name)
    assert set(config["available_node_types"]) == {"headgroup", "cpu-spot"}
    worker = config["available_node_types"]["cpu-spot"]
    assert worker["resources"] == {"CPU": 8, "memory": 32 * GIB, "spot": 1}
    assert worker["labels"] == {MARKET_LABEL: "spot"}
    assert (worker["min_workers"], worker["max_workers"]) == (0, 6)
    assert config["max_workers"] == 6
    assert config["idle_timeout_minutes"] == pytest.approx(5.0)


@pytest.mark.parametrize("job_name", sorted(JOB_SPEC))
def test_market_labels_and_custom_resources_agree_with_the_aws_config(job_name):
    """Head and spot workers carry the same market labels and custom resources on KubeRay as on AWS."""
    aws = load_aws_config()
    aws_types = aws["available_node_types"]
    kuberay_types = _autoscaling_config(job_name)["available_node_types"]
    aws_head = aws_types[aws["head_node_type"]]
    assert kuberay_types["headgroup"]["labels"] == aws_head["labels"]
    assert kuberay_types["headgroup"]["resources"]["on_demand"] == aws_head["resources"]["on_demand"]
    assert kuberay_types["cpu-spot"]["labels"] == aws_types["worker.cpu.spot"]["labels"]
    assert kuberay_types["cpu-spot"]["resources"]["spot"] == aws_types["worker.cpu.spot"]["resources"]["spot"]


def test_lcsc_evaluators_fit_the_workers_the_autoscaler_may_start():
    """The search's evaluators (CPUs each x count) fit on the max workers the autoscaler may start, 2 per node."""
    spec = parse_spec(yaml.safe_load(SPECS[JOB_SPEC["lcsc-search"]]), SearchSpec)
    worker = _autoscaling_config("lcsc-search")["available_node_types"]["cpu-spot"]
    per_node = worker["resources"]["CPU"] // spec.evaluators.num_cpus
    assert per_node == 2
    assert spec.evaluators.num_actors <= per_node * worker["max_workers"]


def test_checkfree_stages_and_standby_fit_one_per_worker():
    """Each stage takes most of one worker (one per node), and stages plus a standby fit the max workers."""
    spec = parse_spec(yaml.safe_load(SPECS[JOB_SPEC["checkfree-train"]]), TrainSpec)
    worker = _autoscaling_config("checkfree-train")["available_node_types"]["cpu-spot"]
    per_node = worker["resources"]["CPU"] // spec.pipeline.num_cpus_per_stage
    assert per_node == 1
    assert spec.pipeline.num_stages + 1 <= worker["max_workers"]
