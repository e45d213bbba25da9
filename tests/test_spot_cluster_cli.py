"""`cluster rehearse` without starting a cluster: bad options are refused before anything starts, and the node
watcher reports joins and leaves."""

from __future__ import annotations

import glob
import socket

import pytest
from click.testing import CliRunner

from checkfree_ray.cli import main as checkfree_main
from lcsc_ray.cli import main as lcsc_main
from rayops.cluster_cli import node_changes


def test_node_changes_lists_joins_then_leaves():
    """A node present only after is a join, one present only before a leave; unchanged nodes are silent."""
    before = {"a" * 8 + "00001": "worker.cpu.spot", "h" * 8 + "00000": "head.on_demand"}
    after = {"h" * 8 + "00000": "head.on_demand", "b" * 8 + "00002": "worker.gpu.spot"}
    assert node_changes(before, after) == [
        "+ worker.gpu.spot bbb00002 joined",
        "- worker.cpu.spot aaa00001 left",
    ]
    assert node_changes(after, after) == []


@pytest.mark.parametrize("main", [lcsc_main, checkfree_main], ids=["lcsc-ray", "checkfree-ray"])
def test_both_clis_mount_cluster_rehearse(main):
    """`lcsc-ray cluster rehearse --help` and `checkfree-ray cluster rehearse --help` both work."""
    result = CliRunner().invoke(main, ["cluster", "rehearse", "--help"])
    assert result.exit_code == 0, result.output
    assert "--spot-events" in result.output and "--dashboard-port" in result.output


@pytest.mark.parametrize(
    "args, named",
    [
        (["--drain-share", "2"], "drain_share"),
        (["--max-workers", "0"], "max_workers"),
        (["--window-s", "0"], "window_s"),
    ],
)
def test_rehearse_refuses_bad_values_before_starting(args, named):
    """A bad value exits 2 with its name, and no cluster temp dir is made."""
    before = set(glob.glob("/tmp/rspot*"))
    result = CliRunner().invoke(lcsc_main, ["cluster", "rehearse", *args])
    assert result.exit_code == 2 and named in result.output, result.output
    assert set(glob.glob("/tmp/rspot*")) <= before


def test_rehearse_refuses_a_dashboard_port_in_use():
    """A --dashboard-port already bound on 127.0.0.1 exits 1 naming the port, before any Ray starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(lcsc_main, ["cluster", "rehearse", "--dashboard-port", str(port)])
    assert result.exit_code == 1 and f"dashboard port {port} is taken" in result.output, result.output


def test_rehearse_refuses_a_dashboard_port_among_ray_worker_ports():
    """A --dashboard-port inside Ray's worker port range (10002-19999) exits 1 with the range and a fix."""
    result = CliRunner().invoke(lcsc_main, ["cluster", "rehearse", "--dashboard-port", "18265"])
    assert result.exit_code == 1 and "10002-19999" in result.output and "8266" in result.output, result.output
