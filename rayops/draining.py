"""Ray's draining nodes (preemption notices), read by both engines between units of work.

A node drains, with a deadline, on `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
--deadline-remaining-seconds N` (what `cluster/spot_drain.py` runs on an AWS spot notice and KubeRay's preStop hook
on an eviction). Ray 2.60 reports draining nodes as `{node_id_hex: deadline_ms}` (0: no deadline); Ray Train V2
polls the same call (`ray.train.PreemptionError`). CheckFree hands stages off (`checkfree_ray/draining.py`); LCSC
replaces evaluators (`lcsc_ray/draining.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray

log = logging.getLogger(__name__)
GCS_TIMEOUT_S = 5.0  # one look at the draining nodes; a GCS that does not answer means "no news" this time


DrainSource = Callable[[], dict[str, int]]  # {node_id_hex: deadline in ms since the epoch; 0 = none}


def gcs_draining_nodes() -> dict[str, int]:
    """Ray's draining nodes and their deadlines, `{node_id_hex: deadline_ms}` (0: no deadline); bounded call."""
    return dict(ray._private.worker.global_worker.gcs_client.get_draining_nodes(timeout=GCS_TIMEOUT_S))


class DrainWatcher:
    """Draining nodes, asked of `source` at most once every `poll_every_s` (in between, the last answer)."""

    def __init__(
        self,
        source: DrainSource | None = None,
        poll_every_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.source = source or gcs_draining_nodes
        self.poll_every_s, self.clock = poll_every_s, clock
        self.last: dict[str, int] = {}
        self.polls = 0
        self._next_at = float("-inf")

    def poll(self, force: bool = False) -> dict[str, int]:
        """`{node_id_hex: deadline_ms}` of the draining nodes (a failed look keeps the last answer)."""
        now = self.clock()
        if not force and now < self._next_at:
            return self.last
        self._next_at = now + self.poll_every_s
        self.polls += 1
        try:
            self.last = dict(self.source())
        except (ray.exceptions.RayError, TimeoutError, ConnectionError, OSError) as exc:
            log.warning(
                "could not read Ray's draining nodes (%s); looking again in %.1fs", exc, self.poll_every_s
            )
        return self.last


def actor_placement(actor_id_hex: str) -> tuple[str | None, str | None]:
    """`(state, node_id_hex)` of an actor in the GCS actor table (None for what it does not hold)."""
    info = ray._private.state.state.actor_table(actor_id_hex) or {}
    return info.get("State"), (info.get("Address") or {}).get("NodeID") or None


def actor_placed(actor_id_hex: str) -> bool:
    """True once the actor has a worker process (it is being constructed or alive); False while it waits for
    resources (the GCS lists no worker port for it yet)."""
    info = ray._private.state.state.actor_table(actor_id_hex) or {}
    return bool((info.get("Address") or {}).get("Port"))


def alive_node_ids() -> set[str]:
    """Hex ids of the nodes the GCS holds ALIVE now (one bounded call)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    client = ray._private.worker.global_worker.gcs_client
    nodes = client.get_all_node_info(timeout=GCS_TIMEOUT_S)
    return {node_id.hex() for node_id, info in nodes.items() if info.state == GcsNodeInfo.ALIVE}


def node_liveness(node_id_hex: str | None) -> tuple[bool | None, bool]:
    """`(alive, draining)` of a node as the GCS holds it now: alive None when the node is unknown (or not given),
    draining True while it has a drain request. Both bounded GCS calls."""
    if not node_id_hex:
        return None, False
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    client = ray._private.worker.global_worker.gcs_client
    nodes = {
        node_id.hex(): info.state for node_id, info in client.get_all_node_info(timeout=GCS_TIMEOUT_S).items()
    }
    alive = None if node_id_hex not in nodes else nodes[node_id_hex] == GcsNodeInfo.ALIVE
    return alive, node_id_hex in gcs_draining_nodes()
