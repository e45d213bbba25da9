"""CheckFree stages on nodes that may not come back: a replacement's wait for a node is bounded by
`recovery.node_wait_s` (past it the run stops, naming the field, leaks nothing, and a rerun resumes it), the stages'
node request (`pipeline.node_resources`, `pipeline.node_labels`) agrees with cluster/aws-spot.yaml, and the run
records the node events it saw."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
from pydantic import ValidationError
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.pool import NodeWaitTimeout, check_labels_present, stage_bundle
from checkfree_ray.run_identity import open_run
from checkfree_ray.train import run_training
from rayops import storage
from rayops.rehearsal_config import MARKET_LABEL, SPOT, load_aws_config, worker_node_types
from schemas.errors import InfeasibleResourcesError
from schemas.loader import load_spec
from schemas.train import TrainSpec
from tests.test_checkfree_engine import tiny_spec

pytestmark = pytest.mark.timeout(600)
SPOT_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_spot.yaml"


def _alive_stage_actors() -> list[str]:
    return [
        actor_id
        for actor_id, actor in ray._private.state.actors().items()
        if actor["State"] != "DEAD" and actor["ActorClassName"] in ("StageWorker", "DirectStageWorker")
    ]


def _squat(group, bundle: int, cpus: float):
    """An actor of the test in bundle `bundle` of the run's placement group: no room is left for a replacement."""

    @ray.remote
    class Squatter:
        def ping(self) -> bool:
            return True

    squatter = Squatter.options(
        num_cpus=cpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle
        ),
    ).remote()
    ray.get(squatter.ping.remote(), timeout=120)
    return squatter


def test_no_node_for_a_replacement_stops_after_node_wait_s_naming_it_then_a_rerun_resumes(
    ray_local, tmp_path
):
    """Stage 1 is lost at step 3 and its bundle is taken (no standby, no room anywhere): the recovery waits
    `recovery.node_wait_s` for a node, then stops the run with NodeWaitTimeout naming the field; the stopped run
    leaves no stage actor and no placement group; run again, it resumes from checkpoint 2 and ends at step 6."""
    spec = tiny_spec(
        "checkfree",
        recovery={"node_wait_s": 3.0},
        checkpointing={"every": 2},
        output={"uri": str(tmp_path / "out")},
    )
    run = open_run(spec)  # what `run_training` does first: the run a rerun resumes
    executor = PipelineExecutor(spec, checkpoint_uri=storage.join(spec.output.uri, "checkpoints"), run=run)
    held = {}

    def lose_stage_1_with_its_bundle(ex: PipelineExecutor, step: int) -> None:
        if step != 3:
            return
        ex.finish_checkpoints()  # checkpoint 2 complete before the loss
        ray.kill(ex.actors[1], no_restart=True)
        held["squatter"] = _squat(ex.pool.group, 1, spec.pipeline.num_cpus_per_stage)

    executor.before_step.append(lose_stage_1_with_its_bundle)
    try:
        executor.start()
        group_id = executor.pool.group.id.hex()
        started = time.monotonic()
        with pytest.raises(NodeWaitTimeout) as stopped:
            step = 1
            while step <= spec.steps:
                step = executor.run_step(step)
        waited = time.monotonic() - started
    finally:
        executor.shutdown()
        if "squatter" in held:
            ray.kill(held["squatter"], no_restart=True)
    message = str(stopped.value)
    assert "stage(s) [1] got no node within 3s (`recovery.node_wait_s`)" in message
    assert "run the same spec again to resume it" in message
    assert waited >= 3.0
    assert executor.history.steps == [1, 2]
    lost = [event for event in executor.history.node_events if event["kind"] == "stage_lost"]
    assert [(event["stage"], event["step"]) for event in lost] == [(1, 3)]
    assert lost[0]["node_id"] == ray.get_runtime_context().get_node_id()

    deadline = time.monotonic() + 60  # ray.kill and placement-group removal are asynchronous
    while (_alive_stage_actors() or placement_group_table().get(group_id, {}).get("state") != "REMOVED") and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert _alive_stage_actors() == []
    assert placement_group_table()[group_id]["state"] == "REMOVED"

    result = run_training(spec, progress=False)  # the rerun of the same spec resumes the stopped run
    assert result.resumed_from == [2]
    assert [s for s, gone in zip(result.steps, result.rolled_back) if not gone] == [1, 2, 3, 4, 5, 6]


def test_rebuilt_stage_is_recorded_as_node_events_with_the_time_until_whole(ray_local, tmp_path):
    """A stage killed at step 2 shows in the result's node events: lost (where, why) then rebuilt (where, how,
    and the seconds until the pipeline was whole again), times in seconds since the epoch."""
    before = time.time()
    spec = tiny_spec(
        "checkfree", schedule=[(2, 1)], warm_standby=True, steps=3, output={"uri": str(tmp_path / "out")}
    )
    result = run_training(spec, progress=False)
    node = ray.get_runtime_context().get_node_id()
    kinds = [(event["kind"], event["stage"], event["node_id"]) for event in result.node_events]
    assert kinds == [("stage_lost", 1, node), ("stage_rebuilt", 1, node)]
    lost, rebuilt = result.node_events
    assert lost["reason"] == "died" and rebuilt["method"] == "checkfree" and rebuilt["warm_standby"]
    assert before <= lost["time"] <= rebuilt["time"] <= time.time()
    assert 0 < rebuilt["whole_after_s"] < rebuilt["time"] - before
    assert result.steps == [1, 2, 3]


def test_node_request_fields_are_checked_naming_the_field():
    """Reserved resource names, amounts <= 0, Ray's own label prefix and a node wait <= 0 are refused by field."""
    for pipeline, field in [
        ({"node_resources": {"CPU": 1}}, "num_cpus_per_stage"),
        ({"node_resources": {"spot": 0}}, "node_resources"),
        ({"node_labels": {"ray.io/market-type": "spot"}}, "node_labels"),
    ]:
        with pytest.raises(ValidationError, match=field):
            TrainSpec.model_validate({"pipeline": pipeline})
    with pytest.raises(ValidationError, match="node_wait_s"):
        TrainSpec.model_validate({"recovery": {"node_wait_s": 0}})
    assert TrainSpec().pipeline.node_resources == {} and TrainSpec().pipeline.node_labels == {}


def test_labels_no_node_has_are_refused_on_a_cluster_that_does_not_grow(ray_local):
    """On the tests' local Ray (no autoscaler), `pipeline.node_labels` no node carries is refused at once."""
    with pytest.raises(InfeasibleResourcesError, match=r"pipeline\.node_labels"):
        check_labels_present({MARKET_LABEL: SPOT})
    check_labels_present({})  # no labels asked: nothing to check


def test_spot_example_asks_for_what_the_spot_workers_of_aws_spot_yaml_carry():
    """examples/train_spot.yaml's stages fit exactly the spot worker types of cluster/aws-spot.yaml (labels and
    custom resources, as the local rehearsal cluster derives them), and no on-demand type."""
    spec = load_spec(SPOT_EXAMPLE)
    assert isinstance(spec, TrainSpec) and spec.pipeline.node_labels == {MARKET_LABEL: SPOT}
    bundle = stage_bundle(spec)
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    assert custom, "the example asks for the spot resource too"
    fits = {
        name
        for name, node in worker_node_types(load_aws_config()).items()
        if all(node["labels"].get(k) == v for k, v in spec.pipeline.node_labels.items())
        and all(node["resources"].get(k, 0) >= v for k, v in bundle.items())
    }
    assert fits == {"worker.cpu.spot", "worker.gpu.spot"}
