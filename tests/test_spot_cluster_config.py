"""The local spot cluster's pieces without a cluster: the autoscaler config derived from cluster/aws-spot.yaml,
the seeded spot-event plan, and finding a cluster's processes by its temp dir."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rayops.rehearsal_config import (
    FAKE_HEAD_TYPE,
    MARKET_LABEL,
    RehearsalConfigError,
    load_aws_config,
    node_labels,
    rehearsal_config,
)
from rayops.spot_cluster import processes_of
from rayops.spot_events import DRAIN, RECLAIM, plan_spot_events

AWS = load_aws_config()
GCS = "127.0.0.1:16001"


def test_rehearsal_keeps_aws_node_types_labels_and_custom_resources():
    """Worker types keep their names, market labels and `spot` resource, with 1 CPU each and GPUs as 1 logical GPU."""
    types = rehearsal_config(AWS, GCS)["available_node_types"]
    assert set(types) == {"worker.cpu.spot", "worker.gpu.spot", FAKE_HEAD_TYPE}
    assert types["worker.cpu.spot"]["resources"] == {"CPU": 1, "spot": 1}
    assert types["worker.gpu.spot"]["resources"] == {"CPU": 1, "GPU": 1, "spot": 1}
    assert types["worker.cpu.spot"]["labels"] == {MARKET_LABEL: "spot"}
    assert types["worker.gpu.spot"]["labels"] == {MARKET_LABEL: "spot"}


def test_rehearsal_head_takes_no_work_and_stays_on_demand():
    """The head keeps `on_demand: 1` and its on-demand label, with 0 CPUs and no workers of its type."""
    config = rehearsal_config(AWS, GCS)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "on_demand": 1}
    assert head["labels"] == {MARKET_LABEL: "on-demand"}
    assert head["max_workers"] == 0


def test_rehearsal_caps_workers_and_sets_idle_timeout_in_seconds():
    """max_workers is capped per type and overall, and 30 s of idle timeout is half a minute."""
    config = rehearsal_config(AWS, GCS, max_workers=2, idle_timeout_s=30, worker_cpus=0.5)
    assert config["max_workers"] == 2
    assert {n: t["max_workers"] for n, t in config["available_node_types"].items()} == {
        "worker.cpu.spot": 2,
        "worker.gpu.spot": 2,
        FAKE_HEAD_TYPE: 0,
    }
    assert config["idle_timeout_minutes"] == pytest.approx(0.5)
    assert config["available_node_types"]["worker.cpu.spot"]["resources"]["CPU"] == 0.5
    assert config["provider"]["gcs_address"] == GCS


def test_rehearsal_config_passes_rays_own_preparation_and_validator():
    """Ray's prepare_config + validate_config (what the v2 monitor runs) accept it and keep the node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(rehearsal_config(AWS, GCS)))
    validate_config(prepared)
    assert prepared["available_node_types"]["worker.cpu.spot"]["labels"] == {MARKET_LABEL: "spot"}
    assert prepared["head_node_type"] == FAKE_HEAD_TYPE


def test_market_label_that_contradicts_the_instance_market_is_refused():
    """A spot node type labelled on-demand is an error naming the field."""
    node_type = copy.deepcopy(AWS["available_node_types"]["worker.cpu.spot"])
    node_type["labels"] = {MARKET_LABEL: "on-demand"}
    with pytest.raises(RehearsalConfigError, match=r"worker.cpu.spot.labels.market-type"):
        node_labels("worker.cpu.spot", node_type)


def test_missing_market_label_is_derived_from_instance_market_options():
    """Without `labels`, the market label comes from InstanceMarketOptions (spot) or its absence (on-demand)."""
    spot = {k: v for k, v in AWS["available_node_types"]["worker.cpu.spot"].items() if k != "labels"}
    head = {k: v for k, v in AWS["available_node_types"]["head.on_demand"].items() if k != "labels"}
    assert node_labels("w", spot) == {MARKET_LABEL: "spot"}
    assert node_labels("h", head) == {MARKET_LABEL: "on-demand"}


@pytest.mark.parametrize("kwargs", [{"worker_cpus": 0}, {"max_workers": 0}, {"idle_timeout_s": -1}])
def test_rehearsal_rejects_bad_sizes(kwargs):
    """Zero CPUs, zero workers or a negative idle timeout are refused."""
    with pytest.raises(RehearsalConfigError):
        rehearsal_config(AWS, GCS, **kwargs)


def test_load_aws_config_names_a_file_without_node_types(tmp_path: Path):
    """A YAML without available_node_types is an error naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"cluster_name": "x"}))
    with pytest.raises(RehearsalConfigError, match="bad.yaml"):
        load_aws_config(path)


def test_spot_event_plan_is_seeded():
    """The same seed gives the same plan, another seed another; moments are sorted inside the window."""
    plan = plan_spot_events(7, count=20, window_s=60.0, notice_s=12.0)
    assert plan == plan_spot_events(7, count=20, window_s=60.0, notice_s=12.0)
    assert plan != plan_spot_events(8, count=20, window_s=60.0, notice_s=12.0)
    moments = [event.at_s for event in plan]
    assert moments == sorted(moments) and 0.0 <= moments[0] and moments[-1] < 60.0
    assert {event.kind for event in plan} == {RECLAIM, DRAIN}
    assert all(0.0 <= event.pick < 1.0 and event.notice_s == 12.0 for event in plan)


def test_spot_event_plan_streams_are_independent():
    """Changing the share of drains changes kinds only: moments and targets come from other streams."""
    all_reclaims = plan_spot_events(3, count=10, window_s=30.0, drain_share=0.0)
    all_drains = plan_spot_events(3, count=10, window_s=30.0, drain_share=1.0)
    assert {e.kind for e in all_reclaims} == {RECLAIM} and {e.kind for e in all_drains} == {DRAIN}
    assert [(e.at_s, e.pick) for e in all_reclaims] == [(e.at_s, e.pick) for e in all_drains]


@pytest.mark.parametrize("kwargs", [{"count": -1}, {"window_s": 0.0}, {"drain_share": 1.5}])
def test_spot_event_plan_rejects_bad_values(kwargs):
    """A negative count, an empty window or a share outside [0, 1] is refused."""
    with pytest.raises(ValueError):
        plan_spot_events(0, **{"count": 3, "window_s": 10.0, **kwargs})


def test_processes_of_finds_marked_processes_and_their_children_only(tmp_path: Path):
    """A process naming the marker and its child are found; one naming a longer path, and this test, are not."""
    marker = str(tmp_path / "marker-dir")
    program = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", program, marker])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker + "-other"])
    found: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while len(found := processes_of(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert parent.pid in found and len(found) == 2
        assert other.pid not in found
    finally:
        for pid in found - {parent.pid}:  # the grandchild
            os.kill(pid, signal.SIGKILL)
        for process in (parent, other):
            process.kill()
            process.wait(timeout=10)
