"""Ray token authentication on the Jobs API: `submit_spec` finds the cluster's token as Ray does, sends it as
a bearer header, never logs it or puts it in an error, and a real token-auth head refuses a submit without it."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from rayops import jobs
from rayops.local_head import ray_env, start_head, stop_process_group
from schemas import SearchSpec
from tests.test_lcsc_search import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
AUTH_VARS = (jobs.AUTH_MODE, jobs.AUTH_TOKEN, jobs.AUTH_TOKEN_PATH)


@pytest.fixture
def clean_auth_env(monkeypatch, tmp_path):
    """No token in the environment and a HOME without ~/.ray/auth_token."""
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# --- where the token comes from -----------------------------------------------------------------------


def test_token_precedence_env_then_path_then_default_file(clean_auth_env, monkeypatch, tmp_path):
    """$RAY_AUTH_TOKEN beats $RAY_AUTH_TOKEN_PATH, which beats ~/.ray/auth_token (read only in token mode)."""
    default = clean_auth_env / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-default\n")
    assert jobs.resolve_auth_token() is None  # the default file alone is not used outside token mode
    monkeypatch.setenv(jobs.AUTH_MODE, "token")
    assert jobs.resolve_auth_token() == "from-default"
    token_file = tmp_path / "token"
    token_file.write_text("  from-path\n")
    monkeypatch.setenv(jobs.AUTH_TOKEN_PATH, str(token_file))
    assert jobs.resolve_auth_token() == "from-path"
    monkeypatch.setenv(jobs.AUTH_TOKEN, "from-env")
    assert jobs.resolve_auth_token() == "from-env"
    assert jobs.auth_headers("from-env") == {"Authorization": "Bearer from-env"}
    assert jobs.auth_headers(None) == {}


def test_unreadable_or_empty_token_file_names_the_file(clean_auth_env, monkeypatch, tmp_path):
    """A missing or empty $RAY_AUTH_TOKEN_PATH file is an error naming the file and the variable."""
    missing = tmp_path / "nope" / "token"
    monkeypatch.setenv(jobs.AUTH_TOKEN_PATH, str(missing))
    with pytest.raises(jobs.JobAuthError, match=r"cannot read .*nope/token .*RAY_AUTH_TOKEN_PATH"):
        jobs.resolve_auth_token()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv(jobs.AUTH_TOKEN_PATH, str(empty))
    with pytest.raises(jobs.JobAuthError, match=r"/empty \(from \$RAY_AUTH_TOKEN_PATH\) is empty"):
        jobs.resolve_auth_token()


# --- what goes over the wire: a stand-in dashboard that enforces a bearer token ------------------------


class _Dashboard(BaseHTTPRequestHandler):
    """Answers the Jobs API requests `submit_spec` makes; 401/403 like Ray's middleware without the token."""

    token = ""
    seen: ClassVar[list[tuple[str, str, str | None]]] = []
    bodies: ClassVar[list[bytes]] = []

    def _handle(self) -> None:
        auth = self.headers.get("Authorization")
        self.seen.append((self.command, self.path, auth))
        length = int(self.headers.get("Content-Length") or 0)
        self.bodies.append(self.rfile.read(length))
        if auth is None:
            return self._reply(401, "Unauthorized: Missing authentication token")
        if auth != f"Bearer {self.token}":
            return self._reply(403, "Forbidden: Invalid authentication token")
        if self.path == "/api/version":
            return self._reply(200, json.dumps({"ray_version": "2.60.0", "version": "4", "ray_commit": "x"}))
        if self.command == "GET" and self.path.startswith("/api/packages/"):
            return self._reply(404, "")
        if self.command == "POST" and self.path.rstrip("/") == "/api/jobs":
            return self._reply(200, json.dumps({"job_id": "raysubmit_1", "submission_id": "raysubmit_1"}))
        return self._reply(200, "{}")

    do_GET = do_PUT = do_POST = _handle

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def dashboard():
    """A stand-in dashboard on loopback that requires a fresh random token."""
    _Dashboard.token, _Dashboard.seen, _Dashboard.bodies = secrets.token_hex(16), [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Dashboard
    server.shutdown()
    thread.join(timeout=10)


def _spec(tmp_path: Path) -> SearchSpec:
    spec = tiny_spec(tmp_path, budget=4)  # the 4 seed vectors of 5 checkpoints
    return spec.model_copy(update={"output": spec.output.model_copy(update={"uri": "s3://bucket/run"})})


def test_submit_sends_the_token_on_every_request_and_never_logs_it(
    clean_auth_env, dashboard, monkeypatch, tmp_path, caplog, capfd
):
    """Every Jobs API request carries the bearer token from $RAY_AUTH_TOKEN_PATH; no log line holds it, and
    it is not forwarded to the job (its runtime env, its uploaded working directory)."""
    address, server = dashboard
    token_file = tmp_path / "token"
    token_file.write_text(server.token + "\n")
    monkeypatch.setenv(jobs.AUTH_TOKEN_PATH, str(token_file))
    caplog.set_level(logging.DEBUG)
    handle = jobs.submit_spec(_spec(tmp_path), "lcsc_ray", "search", SearchSpec, address=address)
    assert handle.job_id == "raysubmit_1"
    assert [path for method, path, _ in server.seen if method == "POST"] == ["/api/jobs/"]
    assert {auth for *_, auth in server.seen} == {f"Bearer {server.token}"}
    captured = capfd.readouterr()
    assert server.token not in caplog.text + captured.out + captured.err
    assert not any(server.token.encode() in body for body in server.bodies)
    assert any(b'"entrypoint"' in body for body in server.bodies)  # the job request itself was inspected


@pytest.mark.parametrize("token", [None, "wrong-token-3f9a"], ids=["no-token", "wrong-token"])
def test_refused_submit_names_the_fix_without_the_token(
    clean_auth_env, dashboard, monkeypatch, tmp_path, caplog, token
):
    """A 401/403 from the cluster is a JobAuthError naming the address and both variables, not the token."""
    address, server = dashboard
    if token:
        monkeypatch.setenv(jobs.AUTH_TOKEN, token)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(jobs.JobAuthError) as info:
        jobs.submit_spec(_spec(tmp_path), "lcsc_ray", "search", SearchSpec, address=address)
    message = str(info.value)
    assert address in message and "RAY_AUTH_TOKEN" in message and "RAY_AUTH_TOKEN_PATH" in message
    assert ("was refused" if token else "no token was given") in message
    assert not any(method == "POST" for method, *_ in server.seen)  # nothing was submitted
    if token:
        assert token not in message and token not in caplog.text


# --- a real Ray head with token authentication ----------------------------------------------------------


def _wait_auth_mode(url: str, process, timeout_s: float = 120.0) -> str:
    """The head's authentication mode, once its dashboard answers (a public endpoint: no token needed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"`ray start --head` exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=5) as response:
                return json.loads(response.read())["authentication_mode"]
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the token-auth head's dashboard at {url} did not answer in {timeout_s:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_token_auth_head_refuses_without_token_and_accepts_with_it(
    clean_auth_env, monkeypatch, tmp_path
):
    """A Ray head started with RAY_AUTH_MODE=token refuses the Jobs API without the token and accepts a job with it."""
    token = secrets.token_hex(16)
    env = {**ray_env(), jobs.AUTH_MODE: "token", jobs.AUTH_TOKEN: token, "HOME": str(clean_auth_env)}
    process, _, url = start_head(num_cpus=1, log_path=tmp_path / "head.log", env=env)
    try:
        assert _wait_auth_mode(url, process) == "token"
        with pytest.raises(jobs.JobAuthError, match="no token was given"):
            jobs._connect(url, jobs.resolve_auth_token())
        monkeypatch.setenv(jobs.AUTH_TOKEN, token)
        client = jobs._connect(url, jobs.resolve_auth_token())
        job_id = jobs._submit_with_retry(client, "python -c \"print('authorised')\"", {}, "auth-check")
        # Accepted: the job exists on the cluster (running it to the end adds nothing about auth, only time).
        assert client.get_job_info(job_id).entrypoint == "python -c \"print('authorised')\""
        assert client.get_job_status(job_id).value in {"PENDING", "RUNNING", "SUCCEEDED"}
    finally:
        stop_process_group(process)


# --- both CLIs' `submit` -----------------------------------------------------------------------------------


def _cli_submit(module: str, spec: str, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m <module> submit <spec> --address <address> --no-wait` with the auth variables in `env`."""
    base = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            module,
            "submit",
            str(ROOT / "examples" / spec),
            "--address",
            address,
            "--no-wait",
        ],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_both_cli_submits_send_the_token_and_never_print_it(dashboard, tmp_path):
    """`lcsc-ray submit` sends $RAY_AUTH_TOKEN; `checkfree-ray submit` with a wrong one exits 1 naming the
    fix; neither prints a token."""
    address, server = dashboard
    accepted = _cli_submit(
        "lcsc_ray", "search_mnist.yaml", address, {"RAY_AUTH_TOKEN": server.token, "HOME": str(tmp_path)}
    )
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "submitted job raysubmit_1" in accepted.stdout
    assert {auth for *_, auth in server.seen} == {f"Bearer {server.token}"}
    wrong = "wrong-" + secrets.token_hex(8)
    refused = _cli_submit(
        "checkfree_ray", "train_small.yaml", address, {"RAY_AUTH_TOKEN": wrong, "HOME": str(tmp_path)}
    )
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert (
        f"error: the Ray cluster at {address} requires token authentication and the token given was refused"
        in refused.stderr
    )
    for run in (accepted, refused):
        assert server.token not in run.stdout + run.stderr and wrong not in run.stdout + run.stderr
