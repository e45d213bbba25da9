"""A real multi-node Ray cluster on loopback, started with `ray start --block` (head + worker nodes, each its
own raylet). Each node's `ray start` process is ours: stopping it stops that node, and nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rayops.s3_server import free_port
from rayops.session import apply_local_ray_env

RAY = str(Path(sys.executable).parent / "ray")


def _node_ports() -> list[str]:
    """Distinct ports for the services of one more node on this machine."""
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    return [f"{name}={free_port()}" for name in names]


@dataclass
class LocalCluster:
    """The head's GCS address and dashboard URL, and one `ray start` process per node."""

    gcs_address: str
    dashboard_url: str
    env: dict
    log_dir: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def add_node(self, num_cpus: float, resources: dict | None = None) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it."""
        # Each node gets its own temp dir: nodes sharing one would garbage-collect each other's unpacked
        # runtime environments (a job's working_dir vanishing under its driver).
        temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        command = [RAY, "start", "--block", f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                   "--node-ip-address=127.0.0.1", "--object-store-memory=200000000", f"--temp-dir={temp_dir}",
                   *_node_ports()]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        node = _spawn(command, self.env, self.log_dir / f"node{len(self.nodes)}.log")
        self.nodes.append(node)
        self.wait_for_nodes(len(self.nodes))
        return node

    def wait_for_nodes(self, count: int, timeout_s: float = 90) -> None:
        """Block until `count` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        probe = f"import ray; ray.init(address='{self.gcs_address}', logging_level='ERROR'); " \
                "print(sum(n['Alive'] for n in ray.nodes()))"
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                                 check=False, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} nodes in {timeout_s}s")

    def kill_node(self, node: subprocess.Popen) -> None:
        """Kill a node abruptly (every process of it at once), as a spot preemption would."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)

    def shutdown(self) -> None:
        """Stop every node this cluster started, head last."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def _spawn(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def local_cluster(worker_cpus: list[float], head_cpus: float, log_dir: Path) -> Iterator[LocalCluster]:
    """A head with the job server plus one worker node per entry of `worker_cpus`."""
    apply_local_ray_env()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # `ray start --address` refuses a second node unless this is 1; every node is pinned to 127.0.0.1 instead.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    port, dashboard = free_port(), free_port()
    head = _spawn([RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={head_cpus}",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   "--object-store-memory=300000000", f"--ray-client-server-port={free_port()}", *_node_ports()],
                  env, log_dir / "head.log")
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, log_dir, [head])
    try:
        cluster.wait_for_nodes(1)
        for i, cpus in enumerate(worker_cpus):
            cluster.add_node(cpus, {f"worker{i}": 1})
        yield cluster
    finally:
        cluster.shutdown()
