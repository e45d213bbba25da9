"""A real multi-node Ray cluster on loopback, started with `ray start --block` (head + worker nodes, each its
own raylet and temp dir). Each node's `ray start` process is ours: stopping it stops that node, nothing else."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rayops.local_head import (
    RAY_CLI,
    node_port_flags,
    ray_env,
    start_head,
    stop_process_group,
    wait_for_dashboard,
)

NODE_START_ATTEMPTS = 2


class NodeExited(RuntimeError):
    """A worker node's `ray start` process ended before the cluster counted the node."""


@dataclass
class LocalCluster:
    """The head's GCS address and dashboard URL, and one `ray start` process per node (head first)."""

    gcs_address: str
    dashboard_url: str
    env: dict
    log_dir: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)
    # custom resource of each worker node -> its `ray start` process and CPUs (the latest node of that name)
    workers: dict[str, tuple[subprocess.Popen, float]] = field(default_factory=dict)

    def add_node(self, num_cpus: float, resources: dict | None = None) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it."""
        # Each node gets its own temp dir: nodes sharing one would garbage-collect each other's unpacked
        # runtime environments (a job's working_dir vanishing under its driver).
        temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        command = [
            RAY_CLI,
            "start",
            "--block",
            f"--address={self.gcs_address}",
            f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=200000000",
            f"--temp-dir={temp_dir}",
            *node_port_flags(),
        ]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        log = open(self.log_dir / f"node{len(self.nodes)}.log", "ab")  # noqa: SIM115 - owned by the child
        for attempt in range(NODE_START_ATTEMPTS):
            node = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.nodes.append(node)
            try:
                self.wait_for_nodes(len(self.nodes), gone=node)
                for name in resources or {}:
                    self.workers[name] = (node, num_cpus)
                return node
            except NodeExited:  # its raylet timed out during start-up on crowded cores: start it again
                self.nodes.remove(node)
                if attempt == NODE_START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def wait_for_nodes(
        self, count: int, timeout_s: float = 120, gone: subprocess.Popen | None = None
    ) -> None:
        """Block until `count` nodes are alive; `NodeExited` if the process `gone` ends first."""
        deadline = time.monotonic() + timeout_s
        probe = (
            f"import ray; ray.init(address='{self.gcs_address}', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        while time.monotonic() < deadline:
            if gone is not None and gone.poll() is not None:
                raise NodeExited(f"the node's `ray start` exited with {gone.returncode} before it joined")
            out = subprocess.run(
                [sys.executable, "-c", probe],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {count} nodes in {timeout_s}s")

    def _probe(self, code: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout.strip().splitlines()[-1]

    def node_ids(self) -> dict[str, str]:
        """Custom resource of each alive worker node (`worker<i>`) -> its Ray node id."""
        code = (
            f"import json, ray; ray.init(address='{self.gcs_address}', logging_level='ERROR'); "
            "print(json.dumps({r: n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "for r in n['Resources'] if r.startswith('worker')}))"
        )
        return json.loads(self._probe(code))

    def actors(self) -> list[dict]:
        """Every actor the state API on the dashboard knows: class name, state and node id."""
        code = (
            "import json; from ray.util.state import list_actors; "
            f"actors = list_actors(address='{self.dashboard_url}', limit=10000, detail=True); "
            "print(json.dumps([{'class_name': a.class_name, 'state': a.state, 'node_id': a.node_id} "
            "for a in actors]))"
        )
        return json.loads(self._probe(code))

    def actor_nodes(self, class_name: str) -> list[str]:
        """Node ids of the alive actors of one class."""
        return [
            a["node_id"] for a in self.actors() if a["class_name"] == class_name and a["state"] == "ALIVE"
        ]

    def worker(self, name: str) -> subprocess.Popen:
        """The `ray start` process of the worker node with custom resource `name` (`worker<i>`)."""
        return self.workers[name][0]

    def restore_workers(self) -> None:
        """Start a fresh node for each worker node that was killed, with its resource name and CPUs, so tests that
        share the cluster each start with every worker alive."""
        for name, (node, cpus) in list(self.workers.items()):
            if node.poll() is not None:
                self.nodes.remove(node)
                self.add_node(cpus, {name: 1})

    def kill_node(self, node: subprocess.Popen) -> None:
        """Kill a node abruptly (every process of it at once), as a spot preemption would."""
        import os
        import signal

        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)

    def shutdown(self) -> None:
        """Stop every node this cluster started, head last."""
        for node in reversed(self.nodes):
            stop_process_group(node)


@contextlib.contextmanager
def local_cluster(
    worker_cpus: list[float], head_cpus: float, log_dir: Path, head_object_store: int | None = None
) -> Iterator[LocalCluster]:
    """A head with the job server (`head_object_store` bytes of object store, else Ray's default) plus one worker
    node per entry of `worker_cpus` (resource `worker<i>`, 200 MB of object store)."""
    env = ray_env(multi_node=True)
    head, gcs, dashboard = start_head(head_cpus, log_dir / "head.log", env, head_object_store)
    cluster = LocalCluster(gcs, dashboard, env, log_dir, [head])
    try:
        wait_for_dashboard(dashboard, head)
        cluster.wait_for_nodes(1)
        for i, cpus in enumerate(worker_cpus):
            cluster.add_node(cpus, {f"worker{i}": 1})
        yield cluster
    finally:
        cluster.shutdown()
