"""A local Ray head started with `ray start --head --block` on loopback, for jobs when no address is given.

Every port is chosen free (the dashboard agent's default port may already be taken by another Ray on the same
machine, which would leave the head without a job agent), the head gets its own temp dir, and stopping it
ends exactly the processes of that `ray start`, nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rayops import settings
from rayops.s3_server import free_port
from rayops.session import LOCAL_RAYLET_START_WAIT_S, RAYLET_START_WAIT

RAY_CLI = str(Path(sys.executable).parent / "ray")


def node_port_flags() -> list[str]:
    """Free ports for the services of one Ray node, as `ray start` flags."""
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ]
    return [f"{name}={free_port()}" for name in names]


def ray_env(multi_node: bool = False) -> dict[str, str]:
    """Environment for `ray start` and job entrypoints: loopback settings and this interpreter's bin on PATH."""
    env = {**os.environ, **settings.LOCAL_RAY_ENV}
    env.setdefault(RAYLET_START_WAIT, LOCAL_RAYLET_START_WAIT_S)  # crowded cores: a raylet can register late
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop(settings.RAY_ADDRESS, None)
    if multi_node:
        # `ray start --address` refuses a second node unless this is 1; nodes are pinned to 127.0.0.1 instead.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    return env


def start_head(
    num_cpus: float | None = None,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    object_store_memory: int | None = None,
) -> tuple[subprocess.Popen, str, str]:
    """Start a head (with `object_store_memory` bytes of object store, else Ray's default); returns (process,
    GCS address, dashboard URL). The process owns its Ray."""
    port, dashboard = free_port(), free_port()
    command = [
        RAY_CLI,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={tempfile.mkdtemp(prefix='rh', dir='/tmp')}",
        *node_port_flags(),
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if object_store_memory is not None:
        command.append(f"--object-store-memory={object_store_memory}")
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        command, env=env or ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"


def wait_for_dashboard(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Block until the head's dashboard answers."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray head's dashboard at {url} did not answer within {timeout_s:.0f}s")


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a `ray start --block` process group (it stops its node), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
