"""The AWS spot notice watcher (cluster/spot_drain.py), offline: it reads the notice through IMDSv2 from a
stand-in metadata service on loopback, parses it, and builds the `ray drain-node` command Ray's CLI accepts."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("spot_drain", ROOT / "cluster" / "spot_drain.py")
spot_drain = sys.modules.setdefault("spot_drain", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(spot_drain)

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)


def test_notice_parsed_and_turned_into_a_preemption_drain():
    """A terminate notice 2 minutes ahead gives a PREEMPTION drain with a 120 s deadline, counted down from now."""
    notice = spot_drain.parse_notice('{"action": "terminate", "time": "2026-11-29T12:02:00Z"}')
    assert notice == spot_drain.Notice("terminate", datetime(2026, 11, 29, 12, 2, tzinfo=timezone.utc))
    command = spot_drain.drain_command(notice, NOW, address="10.0.0.5:6379")
    assert command == [
        "ray",
        "drain-node",
        "--reason",
        "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message",
        "spot terminate at 2026-11-29T12:02:00Z",
        "--deadline-remaining-seconds",
        "120",
        "--address",
        "10.0.0.5:6379",
    ]
    later = datetime(2026, 11, 29, 12, 0, 23, 500000, tzinfo=timezone.utc)
    assert spot_drain.remaining_seconds(notice, later) == 96
    past = datetime(2026, 11, 29, 12, 5, tzinfo=timezone.utc)
    assert spot_drain.remaining_seconds(notice, past) == 0  # a notice read late drains at once


def test_drain_command_is_accepted_by_rays_cli():
    """Ray's own `ray drain-node` parses the built command: flag names and the reason are valid."""
    from ray.scripts.scripts import drain_node

    notice = spot_drain.parse_notice('{"action": "stop", "time": "2026-11-29T12:01:00Z"}')
    command = spot_drain.drain_command(notice, NOW, node_id="ab" * 28)
    context = drain_node.make_context("drain-node", command[2:])
    assert context.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert context.params["deadline_remaining_seconds"] == 60
    assert context.params["node_id"] == "ab" * 28


@pytest.mark.parametrize(
    "body, message",
    [
        ("not json", "not a spot instance-action notice"),
        ('{"time": "2026-11-29T12:02:00Z"}', "not a spot instance-action notice"),
        ('{"action": "reboot", "time": "2026-11-29T12:02:00Z"}', "unknown spot instance action 'reboot'"),
    ],
)
def test_malformed_notice_is_refused_by_name(body, message):
    """A body that is not a spot notice is an error that says so (the watcher logs it and keeps polling)."""
    with pytest.raises(ValueError, match=message):
        spot_drain.parse_notice(body)


class _Imds(BaseHTTPRequestHandler):
    """IMDSv2 as AWS runs it: a PUT for a session token, then GETs that must carry it; 404 until a notice."""

    notice: ClassVar[dict | None] = None
    requests: ClassVar[list[tuple[str, str]]] = []

    def do_PUT(self) -> None:
        self.requests.append(("PUT", self.path))
        ok = self.path == spot_drain.TOKEN_PATH and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200 if ok else 400, "session-token-1")

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != "session-token-1":
            return self._reply(401, "")
        if self.path != spot_drain.NOTICE_PATH or self.notice is None:
            return self._reply(404, "")
        return self._reply(200, json.dumps(self.notice))

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def imds():
    """A stand-in instance metadata service on loopback."""
    _Imds.notice, _Imds.requests = None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def test_watcher_reads_the_notice_through_imdsv2_and_prints_the_drain(imds, capsys):
    """No notice: nothing happens. With a notice: the token PUT, the GET with it, and the drain command."""
    assert spot_drain.fetch_notice(imds) is None
    assert spot_drain.main(["--imds-url", imds, "--once", "--dry-run"]) == 0
    assert capsys.readouterr().out == ""
    _Imds.notice = {"action": "terminate", "time": "2099-01-01T00:00:00Z"}
    assert spot_drain.main(["--imds-url", imds, "--once", "--dry-run", "--node-id", "cd" * 28]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("spot_drain: ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION")
    assert "--node-id " + "cd" * 28 in printed
    assert _Imds.requests[-2:] == [("PUT", spot_drain.TOKEN_PATH), ("GET", spot_drain.NOTICE_PATH)]


def test_watcher_retries_a_refused_drain_until_ray_accepts(imds, tmp_path):
    """A drain that fails (Ray not up yet) is run again at the next poll; the watcher exits once it succeeds."""
    _Imds.notice = {"action": "terminate", "time": "2099-01-01T00:00:00Z"}
    counter = tmp_path / "calls"
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f"#!/bin/sh\necho x >> {counter}\n[ $(wc -l < {counter}) -ge 2 ]\n")
    fake_ray.chmod(0o755)
    assert spot_drain.main(["--imds-url", imds, "--poll-s", "0", "--ray-cli", str(fake_ray)]) == 0
    assert counter.read_text().count("x") == 2


def test_watcher_needs_only_the_standard_library():
    """The watcher imports nothing outside Python's standard library, so it runs on any node image."""
    import ast

    tree = ast.parse((ROOT / "cluster" / "spot_drain.py").read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert modules - {"__future__"} <= set(sys.stdlib_module_names), modules - set(sys.stdlib_module_names)
