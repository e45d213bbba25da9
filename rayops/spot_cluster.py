"""A local autoscaling spot cluster: Ray's own autoscaler (v2) with the fake multi-node provider on this machine.

The head is started with `ray start --head --block` on loopback, with its own temp dir and free ports, and with
the autoscaler config that `rayops/rehearsal_config.py` derives from `cluster/aws-spot.yaml`. The autoscaler then
launches real raylets as worker nodes (named and labelled like the AWS node types) when tasks or actors are
pending, and removes them after the idle timeout.

    with LocalSpotCluster() as cluster:          # or cluster.start() ... cluster.stop()
        cluster.address.gcs_address             # 127.0.0.1:PORT   (ray.init, ray status --address)
        cluster.address.dashboard_url           # http://127.0.0.1:PORT   (ray job submit --address)

Ray's `AutoscalingCluster` wrapper does the same but runs `ray stop --force`, which ends every Ray on the
machine; here `stop()` ends only the processes of this cluster: those whose command line names its temp dir,
and their descendants (worker processes rename themselves to `ray::...`, so they are found by parent).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rayops.cluster_nodes import autoscaler_nodes, wait_until
from rayops.local_head import RAY_CLI, node_port_flags, ray_env, wait_for_dashboard
from rayops.rehearsal_config import (
    AWS_CONFIG_PATH,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_WORKERS,
    DEFAULT_WORKER_CPUS,
    FAKE_HEAD_NODE_ID,
    check_sizes,
    head_node_type,
    load_aws_config,
    rehearsal_config,
)
from rayops.s3_server import free_port, port_is_free

log = logging.getLogger(__name__)
START_TIMEOUT_S = 180.0  # a head starts in ~5 s on quiet cores; shared cores can make it 10x slower
STOP_TIMEOUT_S = 30.0
WORKER_PORTS = (10002, 19999)  # `ray start`'s default --min-worker-port / --max-worker-port
AUTOSCALER_ENV = {
    "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to run without it
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler looks at demand every second (default 5)
    "RAY_enable_autoscaler_v2": "1",
    # The provider knows its head by this id; the head's Ray node id is the same (autoscaler v2 matches them).
    "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
}


class SpotClusterError(RuntimeError):
    """The local spot cluster did not start or stop (the message names its log and temp dir)."""


@dataclass(frozen=True)
class ClusterAddress:
    """Where to reach a running cluster."""

    gcs_address: str  # 127.0.0.1:PORT: ray.init(address=...), `ray status --address`
    dashboard_url: str  # http://127.0.0.1:PORT: `ray job submit --address`, the dashboard


def proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process this user can read, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        table[int(entry)] = (ppid, cmdline)
    return table


def _self_and_ancestors(table: dict[int, tuple[int, str]]) -> set[int]:
    pid, chain = os.getpid(), set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        pid = table.get(pid, (0, ""))[0]
    return chain


def processes_of(marker: str, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """Pids whose command line contains `marker` (a cluster's temp dir), and all their descendants; never this
    process or its ancestors (a shell or script that names the temp dir in its own command line)."""
    table = proc_table() if table is None else table
    whole = re.compile(re.escape(marker) + r"(?=[/\s]|$)")  # /tmp/rspotAB must not match /tmp/rspotABC
    found = {pid for pid, (_, cmdline) in table.items() if whole.search(cmdline)} - _self_and_ancestors(table)
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def signal_all(pids: set[int], sig: int) -> None:
    """Send `sig` to each pid (one already gone is skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LocalSpotCluster:
    """A local autoscaling cluster shaped like `aws_config_path` (see the module docstring)."""

    def __init__(
        self,
        aws_config_path: str | Path = AWS_CONFIG_PATH,
        *,
        worker_cpus: float = DEFAULT_WORKER_CPUS,
        max_workers: int = DEFAULT_MAX_WORKERS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        dashboard_port: int | None = None,
        log_path: str | Path | None = None,
    ):
        check_sizes(worker_cpus, max_workers, idle_timeout_s)
        self.aws_config = load_aws_config(aws_config_path)
        self.worker_cpus, self.max_workers, self.idle_timeout_s = worker_cpus, max_workers, idle_timeout_s
        self.dashboard_port, self.log_path = dashboard_port, log_path  # dashboard_port None: a free port
        self.temp_dir: str | None = None
        self.address: ClusterAddress | None = None
        self._process: subprocess.Popen | None = None

    def _head_command(self, port: int, dashboard_port: int, config_file: str) -> list[str]:
        head = head_node_type(self.aws_config)
        resources = {k: v for k, v in head["resources"].items() if k != "CPU"}
        labels = ",".join(f"{k}={v}" for k, v in head["labels"].items())
        return [
            RAY_CLI,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.temp_dir}",
            "--num-cpus=0",
            f"--resources={json.dumps(resources)}",
            f"--labels={labels}",
            f"--autoscaling-config={config_file}",
            *node_port_flags(),
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ClusterAddress:
        """Start the head (and with it the autoscaler); returns its addresses once the dashboard answers and the
        autoscaler has reported the head."""
        if self._process is not None:
            raise SpotClusterError(
                f"this cluster is already started (temp dir {self.temp_dir}); stop() it first"
            )
        if self.dashboard_port and WORKER_PORTS[0] <= self.dashboard_port <= WORKER_PORTS[1]:
            raise SpotClusterError(
                f"dashboard port {self.dashboard_port} is in the range Ray's worker processes use "
                f"({WORKER_PORTS[0]}-{WORKER_PORTS[1]}); pick one outside it, e.g. 8266"
            )
        if self.dashboard_port and not port_is_free(self.dashboard_port):
            raise SpotClusterError(
                f"dashboard port {self.dashboard_port} is taken on 127.0.0.1 (another Ray?); "
                "pick another port or leave it out for a free one"
            )
        port, dashboard_port = free_port(), self.dashboard_port or free_port()
        config = rehearsal_config(
            self.aws_config,
            f"127.0.0.1:{port}",
            worker_cpus=self.worker_cpus,
            max_workers=self.max_workers,
            idle_timeout_s=self.idle_timeout_s,
        )
        self.temp_dir = tempfile.mkdtemp(prefix="rspot", dir="/tmp")  # short: Ray's socket paths have a limit
        config_file = os.path.join(self.temp_dir, "autoscaler.json")
        Path(config_file).write_text(json.dumps(config, indent=1))
        command = self._head_command(port, dashboard_port, config_file)
        log_path = self.log_path or os.path.join(self.temp_dir, "head.log")
        with open(log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                env={**ray_env(), **AUTOSCALER_ENV},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.address = ClusterAddress(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
        try:
            began = time.monotonic()
            wait_for_dashboard(self.address.dashboard_url, self._process, timeout_s)
            wait_until(
                lambda: any(node.is_head for node in autoscaler_nodes(self.address.gcs_address)),
                max(1.0, timeout_s - (time.monotonic() - began)),
                "the autoscaler's first report",
            )
        except (RuntimeError, TimeoutError) as exc:
            tail = Path(log_path).read_text(errors="replace")[
                -2000:
            ]  # read before stop() removes the temp dir
            self.stop()
            raise SpotClusterError(
                f"the local spot cluster did not start: {exc}; the end of its log ({log_path}):\n{tail}"
            ) from None
        except BaseException:  # Ctrl-C while waiting: leave nothing running
            self.stop()
            raise
        log.info(
            "local spot cluster up: GCS %s, dashboard %s, temp dir %s",
            self.address.gcs_address,
            self.address.dashboard_url,
            self.temp_dir,
        )
        return self.address

    def pids(self) -> set[int]:
        """The pids of every process of this cluster still running (empty before start and after stop)."""
        return processes_of(self.temp_dir) if self.temp_dir else set()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """End this cluster's processes (the autoscaler first, so it launches nothing more), then remove its
        temp dir. Other Rays on the machine are not touched."""
        if self.temp_dir is None:
            return
        table = proc_table()
        first = {
            pid
            for pid, (_, cmdline) in table.items()
            if self.temp_dir in cmdline and ("monitor.py" in cmdline or " start --head" in cmdline)
        }
        signal_all(first, signal.SIGKILL)
        signal_all(processes_of(self.temp_dir, table) - first, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        signal_all(left, signal.SIGKILL)
        if self._process is not None:
            self._process.wait(timeout=timeout_s)  # reap the `ray start` we own
            self._process = None
        if left := self.pids():
            raise SpotClusterError(
                f"processes {sorted(left)} of the cluster in {self.temp_dir} outlived SIGKILL"
            )
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        log.info("local spot cluster in %s stopped", self.temp_dir)
        self.temp_dir = None

    def __enter__(self) -> LocalSpotCluster:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
