"""What a cluster's GCS says about its nodes: the autoscaler's view (node types), liveness and drains.

Every call goes to the GCS at an explicit address (not through `ray.init`), so a test or a CLI can watch a
cluster other than the Ray its own process may be connected to. Each call is bounded by a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

GCS_TIMEOUT_S = 10  # one GCS query; a busy 2-core machine can take seconds
T = TypeVar("T")


@dataclass(frozen=True)
class ClusterNode:
    """A running node as the autoscaler sees it."""

    node_id: str  # Ray node id, hex
    node_type: str  # the autoscaler's node-type name, e.g. worker.cpu.spot
    is_head: bool
    labels: dict[str, str] = field(default_factory=dict)


def gcs_client(gcs_address: str):
    """A GCS client of the cluster at `gcs_address` (no `ray.init` needed)."""
    from ray._raylet import GcsClient

    return GcsClient(address=gcs_address)


def autoscaler_nodes(gcs_address: str, timeout_s: int = GCS_TIMEOUT_S) -> list[ClusterNode]:
    """The active and idle nodes of the autoscaler's last report, sorted by node id (pending ones excluded)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    from rayops.rehearsal_config import FAKE_HEAD_NODE_ID, FAKE_HEAD_TYPE

    status = get_cluster_status(gcs_address, timeout=timeout_s)
    nodes = [
        ClusterNode(
            node.node_id,
            node.ray_node_type_name,
            node.node_id == FAKE_HEAD_NODE_ID or node.ray_node_type_name == FAKE_HEAD_TYPE,
            dict(node.labels or {}),
        )
        for node in [*status.active_nodes, *status.idle_nodes]
        if node.node_id
    ]
    return sorted(nodes, key=lambda node: node.node_id)


def worker_nodes(gcs_address: str, timeout_s: int = GCS_TIMEOUT_S) -> list[ClusterNode]:
    """The autoscaler's running worker nodes (the head excluded), sorted by node id."""
    return [node for node in autoscaler_nodes(gcs_address, timeout_s) if not node.is_head]


def alive_node_ids(gcs_address: str, timeout_s: float = GCS_TIMEOUT_S) -> set[str]:
    """Hex ids of the nodes the GCS holds ALIVE (a killed node leaves this set once its health checks fail)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    nodes = gcs_client(gcs_address).get_all_node_info(timeout=timeout_s)
    return {node_id.hex() for node_id, info in nodes.items() if info.state == GcsNodeInfo.ALIVE}


def draining_nodes(gcs_address: str, timeout_s: float = GCS_TIMEOUT_S) -> dict[str, int]:
    """`{node_id_hex: deadline_ms}` of the draining nodes (0: no deadline), as the GCS reports them."""
    return dict(gcs_client(gcs_address).get_draining_nodes(timeout=timeout_s))


def wait_until(probe: Callable[[], T | None], timeout_s: float, what: str, poll_s: float = 1.0) -> T:
    """Call `probe` until it returns something truthy and return that; TimeoutError naming `what` otherwise.
    Errors of a probe (a GCS briefly busy) count as "not yet"; the last one is named in the timeout."""
    from ray.exceptions import RayError

    deadline, last_error = time.monotonic() + timeout_s, None
    while True:
        try:
            value = probe()
            if value:
                return value
        except (OSError, RayError) as exc:  # a GCS call that timed out or was refused
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}{detail}")
        time.sleep(poll_s)
