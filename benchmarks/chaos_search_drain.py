"""The drain event of `benchmarks/chaos_search.py`: a preemption notice for the node that holds both evaluators,
each with a candidate in flight, then that node killed at the notice's deadline (a spot reclaim).

A chaos run's search runs on a local multi-node Ray (`tests/multinode.py`: `ray start --block` per node, each with
its own temp dir): a head without CPUs (the driver, the pool service and Tune's trial actors, which need none)
and nodes A and B of 1 CPU each, node B's CPU held by a blocker actor (of a small driver of the harness's own),
so both evaluators (half a CPU each) start on node A. From the drain moment on, the harness watches (bounded, while its
other events go on) for both evaluators to be busy, then frees node B (room for the replacements: the blocker's driver is killed) and drains node A
with Ray's own CLI (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`); node A is killed at the deadline.
(Adding node B only at the drain took 5-18 s on crowded cores, and the search ran on past its other events.) The
driver's Ray workers inherit the run's marker through the job's runtime environment
(`RAY_JOB_CONFIG_JSON_ENV_VAR`), so the harness finds and kills them, and checks for leaks, as on a local Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rayops.local_head import RAY_CLI
from tests.multinode import LocalCluster, local_cluster

DEADLINE_S = 30  # the notice's deadline (an AWS spot notice gives 120 s; shorter keeps the run short)
BUSY_WAIT_S = 20.0  # how long to wait for both evaluators to be busy before draining anyway
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray reads the job's runtime environment from it at ray.init
BLOCKER = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=1, resources={"worker1": 1})
class Blocker:
    def ready(self):
        return True

blocker = Blocker.remote()
ray.get(blocker.ready.remote(), timeout=300)
print("blocking", flush=True)
sys.stdin.read()
"""


@dataclass
class DrainCluster:
    """The run's cluster, node A's process, and the pending reclaim (monotonic deadline) once node A drains."""

    cluster: LocalCluster
    node_a: subprocess.Popen
    node_a_id: str = ""
    blocker: subprocess.Popen | None = None
    armed: tuple[int, float] | None = None  # (the drain's moment, when it came)
    deadline: float | None = None

    def block_node_b(self) -> None:
        """Hold node B's CPU with an actor of a driver of our own (its process group is ours to kill)."""
        self.blocker = subprocess.Popen(
            [sys.executable, "-c", BLOCKER, self.cluster.gcs_address],
            env=self.cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        lines = []
        while (line := self.blocker.stdout.readline()) and line.strip() != "blocking":
            lines.append(line)
        if not line:
            raise RuntimeError(
                f"the blocker of node B exited before it held the CPU: {''.join(lines)[-500:]!r}"
            )

    def free_node_b(self) -> None:
        """Kill the blocker's driver: Ray ends its actor and node B's CPU is free."""
        if self.blocker is not None and self.blocker.poll() is None:
            os.killpg(self.blocker.pid, signal.SIGKILL)
            self.blocker.wait(timeout=30)

    def driver_env(self, mark: str, tag: str) -> dict[str, str]:
        """Environment of a driver that joins this cluster; its Ray workers carry `mark=tag` too."""
        job = {"runtime_env": {"env_vars": {mark: tag}}}
        return {**self.cluster.env, "RAY_ADDRESS": self.cluster.gcs_address, JOB_CONFIG_ENV: json.dumps(job)}

    def arm(self, moment: int) -> None:
        """The drain's moment has come: drain as soon as both evaluators are busy (`drain_if_ready`)."""
        self.armed = (moment, time.monotonic())

    def drain_if_ready(self, busy: Callable[[], int]) -> dict | None:
        """Once armed, when `busy()` (evaluators mid-call) is 2, or BUSY_WAIT_S after arming: free node B and drain
        node A. Returns what happened (the moment, evaluators busy at the notice, seconds waited), else None."""
        if self.armed is None:
            return None
        moment, since = self.armed
        in_flight = busy()
        if in_flight < 2 and time.monotonic() - since < BUSY_WAIT_S:
            return None
        self.armed = None
        self.free_node_b()
        command = [
            RAY_CLI,
            "drain-node",
            f"--address={self.cluster.gcs_address}",
            f"--node-id={self.node_a_id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=chaos spot notice",
            f"--deadline-remaining-seconds={DEADLINE_S}",
        ]
        subprocess.run(command, env=self.cluster.env, check=True, timeout=120, capture_output=True)
        self.deadline = time.monotonic() + DEADLINE_S
        return {
            "moment": moment,
            "busy_at_notice": in_flight,
            "node": self.node_a_id[:12],
            "waited_s": round(time.monotonic() - since, 1),
        }

    def reclaim_due(self) -> bool:
        """Kill node A once the notice's deadline has come (True when this call killed it)."""
        if self.deadline is None or time.monotonic() < self.deadline:
            return False
        self.deadline = None
        if self.node_a.poll() is not None:  # its raylet already left (drained and idle)
            return False
        self.cluster.kill_node(self.node_a)
        return True


@contextlib.contextmanager
def drain_cluster(log_dir: Path) -> Iterator[DrainCluster]:
    """A head without CPUs, node A (resource `worker0`) and node B (`worker1`, its CPU blocked) of 1 CPU each;
    everything it started is stopped at the end (only its own processes)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with local_cluster([1, 1], head_cpus=0, log_dir=log_dir) as cluster:
        drain = DrainCluster(cluster, cluster.nodes[1], cluster.node_ids()["worker0"])
        try:
            drain.block_node_b()
            yield drain
        finally:
            drain.free_node_b()
