"""End to end on a real local autoscaling cluster: demand launches spot workers, a reclaim and a drain hit them,
the cluster shrinks back to its head when idle, and stopping it leaves no process behind."""

from __future__ import annotations

import time

import pytest

from rayops.cluster_nodes import alive_node_ids, autoscaler_nodes, draining_nodes, wait_until, worker_nodes
from rayops.rehearsal_config import MARKET_LABEL
from rayops.spot_events import DRAIN, RECLAIM, TERMINATE, PlannedEvent, SpotEventInjector
from tests.spot_cluster_fixtures import start_driver  # spot_cluster: registered by tests/conftest.py

TASKS = 3
HOLD_S = 45  # each task holds its CPU this long: the workers are busy when the events hit them
NOTICE_S = 15
DRIVER = f"""
import time, ray
ray.init(address=GCS)

@ray.remote(num_cpus=1, max_retries=5)
def hold(seconds):
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()

print("ran on", ray.get([hold.remote({HOLD_S}) for _ in range({TASKS})], timeout=900), flush=True)
"""


def _workers_up(gcs: str, count: int):
    workers = worker_nodes(gcs)
    return workers if len(workers) >= count else None


# `extended` (`make test-extended`): the cluster on its own, with plain tasks. Its scale-up on pending demand, a
# reclaim, a PREEMPTION drain and the shrink back to the head are checked under real jobs by
# tests/test_lcsc_spot_e2e.py and tests/test_checkfree_spot_e2e.py (same shared cluster), its config and labels by
# tests/test_spot_cluster_config.py, its events by tests/test_spot_cluster_events.py.
@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_spot_cluster_scales_survives_reclaim_and_drain_and_shrinks(spot_cluster, tmp_path):
    """Three 1-CPU tasks launch three spot workers; a reclaim and a drain remove two; idle, it shrinks to the head."""
    gcs = spot_cluster.address.gcs_address
    head = [node for node in autoscaler_nodes(gcs) if node.is_head]
    assert len(head) == 1 and head[0].labels.get(MARKET_LABEL) == "on-demand"

    driver = start_driver(gcs, DRIVER, tmp_path / "driver.log")
    try:
        workers = wait_until(lambda: _workers_up(gcs, TASKS), 300, f"{TASKS} worker nodes to be launched")
        assert {node.node_type for node in workers} == {"worker.cpu.spot"}
        assert all(node.labels.get(MARKET_LABEL) == "spot" for node in workers)

        injector = SpotEventInjector(gcs, spot_cluster.temp_dir)
        events = injector.run([PlannedEvent(0.0, RECLAIM, 0.0, 0.0), PlannedEvent(1.0, DRAIN, NOTICE_S, 0.0)])
        assert [event.kind for event in events] == [RECLAIM, DRAIN]
        reclaimed, drained = events
        assert reclaimed.node_id != drained.node_id and reclaimed.killed_pids >= 1
        assert drained.listed_draining  # the GCS listed the node as draining right after the request
        draining = draining_nodes(gcs)
        assert (
            draining.get(drained.node_id) == drained.deadline_ms > time.time() * 1000
        )  # before the deadline

        wait_until(lambda: reclaimed.node_id not in alive_node_ids(gcs), 180, "the reclaimed node to die")
        injector.wait_for_terminations(NOTICE_S + 60)
        terminated = [event for event in injector.events if event.kind == TERMINATE]
        assert [event.node_id for event in terminated] == [drained.node_id]
        assert terminated[0].wall_time * 1000 >= drained.deadline_ms
        wait_until(lambda: drained.node_id not in alive_node_ids(gcs), 180, "the drained node to die")

        assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)

    head_id = head[0].node_id
    wait_until(
        lambda: alive_node_ids(gcs) == {head_id} and not worker_nodes(gcs),
        300,
        "the cluster to shrink back to its head",
    )
    assert [event["kind"] for event in injector.timeline()] == [RECLAIM, DRAIN, TERMINATE]
