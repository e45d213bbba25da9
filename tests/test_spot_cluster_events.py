"""The spot-event injector without a Ray cluster: which node a planned event hits, what happens when there is
none, and that a reclaim kills exactly the node's raylet and what it started (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayops import spot_events
from rayops.cluster_nodes import ClusterNode
from rayops.spot_cluster import proc_table
from rayops.spot_events import RECLAIM, SKIPPED, PlannedEvent, SpotEventError, SpotEventInjector

HEAD = ClusterNode("f" * 51 + "00000", "ray.head.default", True)
WORKERS = [ClusterNode("f" * 51 + f"0000{i}", "worker.cpu.spot", False) for i in (1, 2, 3)]


@pytest.fixture
def three_workers(monkeypatch):
    """The injector sees three running workers (sorted by id), without a GCS."""
    monkeypatch.setattr(spot_events, "worker_nodes", lambda gcs: list(WORKERS))


def test_pick_target_indexes_the_sorted_workers_and_skips_hit_ones(three_workers):
    """pick 0 hits the first worker and 0.99 the last; a node already hit is never picked again."""
    injector = SpotEventInjector("127.0.0.1:1", "/tmp/none")
    assert injector.pick_target(0.0) == WORKERS[0]
    assert injector.pick_target(0.99) == WORKERS[2]
    injector._hit.add(WORKERS[0].node_id)
    assert injector.pick_target(0.0) == WORKERS[1]


def test_run_records_skipped_when_no_worker_is_up(monkeypatch):
    """A planned event with no worker to hit is recorded as SKIPPED, not raised."""
    monkeypatch.setattr(spot_events, "worker_nodes", lambda gcs: [])
    injector = SpotEventInjector("127.0.0.1:1", "/tmp/none")
    events = injector.run([PlannedEvent(0.0, RECLAIM, 0.0, 0.5)])
    assert [event.kind for event in events] == [SKIPPED]


def test_event_on_a_node_already_gone_is_skipped_with_the_reason(three_workers, tmp_path):
    """A reclaim whose raylet is not there (the autoscaler just removed it) is SKIPPED, naming the node."""
    injector = SpotEventInjector("127.0.0.1:1", str(tmp_path))
    event = injector.inject(PlannedEvent(0.0, RECLAIM, 0.0, 0.0))
    assert event.kind == SKIPPED and event.node_id == WORKERS[0].node_id
    assert "no raylet" in event.detail
    assert injector.pick_target(0.0) == WORKERS[1]  # never tried twice


def test_head_is_never_reclaimed_or_drained():
    """Reclaiming or draining the head is refused: only workers are spot capacity."""
    injector = SpotEventInjector("127.0.0.1:1", "/tmp/none")
    with pytest.raises(SpotEventError, match="head"):
        injector.reclaim(HEAD)
    with pytest.raises(SpotEventError, match="head"):
        injector.drain(HEAD, notice_s=5)


def _wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def test_reclaim_kills_the_node_raylet_and_its_children_only(tmp_path: Path):
    """A process named raylet with the node's id and temp dir dies with its child; another node's raylet lives."""
    raylet = tmp_path / "raylet"
    os.symlink(sys.executable, raylet)
    temp_dir = str(tmp_path / "cluster")
    program = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    target = subprocess.Popen([str(raylet), "-c", program, f"--node_id={WORKERS[0].node_id}", temp_dir])
    other = subprocess.Popen([str(raylet), "-c", program, f"--node_id={WORKERS[1].node_id}", temp_dir])
    try:
        child = _wait_for(lambda: [p for p, (pp, _) in proc_table().items() if pp == target.pid])
        assert child, "the fake raylet's child did not start"
        event = SpotEventInjector("127.0.0.1:1", temp_dir).reclaim(WORKERS[0])
        assert event.kind == RECLAIM and event.killed_pids == 2
        assert target.wait(timeout=30) == -9
        assert _wait_for(lambda: child[0] not in proc_table() or proc_table()[child[0]][1] == "")
        assert other.poll() is None
    finally:
        for process in (target, other):
            for pid in [p for p, (pp, _) in proc_table().items() if pp == process.pid]:
                os.kill(pid, signal.SIGKILL)  # its `sleep`
            process.kill()
            process.wait(timeout=30)
