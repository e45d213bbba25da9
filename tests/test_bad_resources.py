"""Requests a fixed-size cluster can never place fail at once, naming what is asked and what is there."""

from __future__ import annotations

import logging

import pytest

from rayops import resources
from rayops.resources import check_placeable, placement_problem
from schemas.errors import InfeasibleResourcesError

NODES = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 4.0, "GPU": 1.0}]


@pytest.mark.parametrize(
    ("bundles", "strategy", "expected"),
    [
        ([{"CPU": 1.0}] * 6, "PACK", None),
        ([{"CPU": 1.0}] * 7, "PACK", "7 CPU in all, the cluster has 6"),
        ([{"CPU": 5.0}], "PACK", "on a single node"),
        ([{"GPU": 1.0, "CPU": 3.0}], "SPREAD", None),
        ([{"GPU": 1.0, "CPU": 1.0}] * 2, "PACK", "2 GPU in all, the cluster has 1"),
        ([{"CPU": 1.0}] * 3, "STRICT_SPREAD", "needs 3 nodes"),
        ([{"CPU": 3.0}] * 2, "STRICT_PACK", "on one node"),
        ([{"CPU": 0.5, "GPU": 0.0}] * 4, "PACK", None),
    ],
)
def test_placement_problem_pure(bundles, strategy, expected):
    """Totals, single-node fit and strict strategies are judged against the nodes' resources."""
    problem = placement_problem(bundles, NODES, strategy)
    assert problem == expected if expected is None else expected in problem


@pytest.mark.timeout(60)
def test_pipeline_too_big_for_the_cluster_fails_at_once(ray_local):
    """`num_cpus_per_stage: 4` on a 2-CPU local Ray is refused by the stage pool at once, not after 120 s."""
    from checkfree_ray.pool import StagePool
    from schemas.train import TrainSpec

    spec = TrainSpec.model_validate({"pipeline": {"num_cpus_per_stage": 4}})
    with pytest.raises(InfeasibleResourcesError) as info:
        StagePool(spec, None)
    message = str(info.value)
    assert "the cluster has 2" in message and "`pipeline.num_cpus_per_stage`" in message
    assert "'CPU': 4" in message and "does not grow" in message


def test_evaluators_over_the_cluster_total_fail_at_once(ray_local):
    """Evaluator CPUs beyond the cluster's total are refused, naming the evaluator fields."""
    with pytest.raises(
        InfeasibleResourcesError, match=r"3 CPU in all, the cluster has 2.*evaluators.num_actors"
    ):
        check_placeable([{"CPU": 1.0, "GPU": 0.0}] * 3, "the evaluator actors", "`evaluators.num_actors`")


def test_local_ray_does_not_autoscale(ray_local, monkeypatch):
    """A local Ray (its monitor runs without an autoscaling config) is detected as fixed-size."""
    monkeypatch.delenv(resources.AUTOSCALING_ENV, raising=False)
    assert resources.cluster_autoscales() is False


def test_autoscaling_cluster_waits_and_says_what_is_awaited(ray_local, monkeypatch, caplog):
    """On an autoscaling cluster the request is allowed, with a warning naming what is awaited."""
    monkeypatch.setenv(resources.AUTOSCALING_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="rayops.resources"):
        check_placeable([{"CPU": 8.0}], "the pipeline's placement group", "`pipeline.num_cpus_per_stage`")
    assert "8 CPU in all" in caplog.text and "waiting for the autoscaler" in caplog.text
