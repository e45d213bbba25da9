"""Spot events on a local spot cluster, at seeded moments: reclaims without notice, and drains with a deadline.

- **Reclaim without notice** (a spot instance taken back at once): the worker node's raylet and everything it
  started (its workers and agents) are SIGKILLed together. The fake provider that could `terminate_node`
  lives inside the head's autoscaler process, out of reach, so the node is killed the way a lost instance
  looks to Ray: its raylet stops answering, the GCS marks it dead after its health checks fail, and the
  autoscaler (which still lists the instance) terminates it through the provider, which reaps the node's
  remaining processes. The raylet is found by its `--node_id=<hex>` and the cluster's temp dir in its
  command line.
- **Reclaim with notice** (AWS's two-minute warning): the GCS drains the node with reason PREEMPTION and a
  deadline, exactly what `ray drain-node` does (and `cluster/spot_drain.py` runs on a real notice); at the
  deadline the node is killed as above.

Each event is recorded (kind, node id, node type, time) for a timeline. `plan_spot_events(seed, ...)` draws the
moments, kinds and targets from `np.random.SeedSequence(seed)`, each from its own stream.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from rayops.cluster_nodes import GCS_TIMEOUT_S, ClusterNode, draining_nodes, gcs_client, worker_nodes
from rayops.spot_cluster import proc_table, signal_all

log = logging.getLogger(__name__)
RECLAIM, DRAIN, TERMINATE, SKIPPED = "reclaim", "drain", "terminate", "skipped"
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # the reason `cluster/spot_drain.py` gives Ray


class SpotEventError(RuntimeError):
    """A spot event could not be injected (the message names the node and why)."""


@dataclass(frozen=True)
class PlannedEvent:
    """One event of a plan: when (seconds after the run starts), what, and which worker node."""

    at_s: float
    kind: str  # RECLAIM or DRAIN
    notice_s: float  # a drain's deadline, seconds after the drain (unused for a reclaim)
    pick: float  # in [0, 1): the target is the worker at index floor(pick * n) of the n alive, sorted by id


@dataclass(frozen=True)
class SpotEvent:
    """One event that happened, for the timeline."""

    kind: str  # RECLAIM, DRAIN, TERMINATE (a drained node at its deadline) or SKIPPED (no worker to hit)
    node_id: str
    node_type: str
    at_s: float  # seconds since the injector was made (monotonic clock)
    wall_time: float  # seconds since the epoch
    deadline_ms: int = 0  # a drain's deadline, ms since the epoch
    listed_draining: bool = False  # a drain: the GCS listed the node as draining right after the request
    killed_pids: int = 0  # processes killed (a reclaim or a termination)
    detail: str = ""  # why an event was SKIPPED


def plan_spot_events(
    seed: int,
    count: int,
    window_s: float,
    notice_s: float = 20.0,
    drain_share: float = 0.5,
    both_kinds: bool = False,
) -> list[PlannedEvent]:
    """`count` events at sorted uniform moments in [0, window_s), a share `drain_share` of them drains;
    moments, kinds and targets come from separate streams of `SeedSequence(seed)`. `both_kinds`: a plan of 2 or
    more events that drew one kind only gets the other kind at one event, drawn from the kinds' stream."""
    if count < 0 or window_s <= 0 or notice_s < 0 or not 0.0 <= drain_share <= 1.0:
        raise ValueError(
            f"need count >= 0 ({count}), window_s > 0 ({window_s}), notice_s >= 0 ({notice_s}) "
            f"and 0 <= drain_share <= 1 ({drain_share})"
        )
    if both_kinds and count < 2:
        raise ValueError(f"both_kinds needs count >= 2 events, got {count}")
    moments, kinds, picks = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    at = np.sort(moments.uniform(0.0, window_s, count))
    is_drain = kinds.uniform(size=count) < drain_share
    if both_kinds and (is_drain.all() or not is_drain.any()):
        is_drain[int(kinds.integers(count))] = not is_drain[0]
    targets = picks.uniform(size=count)
    return [
        PlannedEvent(float(t), DRAIN if d else RECLAIM, float(notice_s), float(p))
        for t, d, p in zip(at, is_drain, targets, strict=True)
    ]


def raylet_pids(temp_dir: str, node_id: str) -> set[int]:
    """The raylet of node `node_id` in the cluster whose temp dir is `temp_dir`, with all its descendants."""
    table = proc_table()
    raylets = {
        pid
        for pid, (_, cmdline) in table.items()
        if cmdline.split(" ", 1)[0].endswith("/raylet")
        and f"--node_id={node_id}" in cmdline
        and temp_dir in cmdline
    }
    found = set(raylets)
    for pid in raylets:
        found |= _descendants(pid, table)
    return found


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


class SpotEventInjector:
    """Injects spot events on the cluster whose GCS is `gcs_address` and whose processes name `temp_dir`."""

    def __init__(self, gcs_address: str, temp_dir: str):
        self.gcs_address, self.temp_dir = gcs_address, temp_dir
        self.events: list[SpotEvent] = []
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._hit: set[str] = set()  # nodes already reclaimed or drained: never hit twice

    def _record(self, event: SpotEvent) -> SpotEvent:
        with self._lock:
            self.events.append(event)
        log.info(
            "spot event at %.1fs: %s %s %s%s",
            event.at_s,
            event.kind,
            event.node_type,
            event.node_id,
            f" (deadline in {event.deadline_ms / 1000 - event.wall_time:.0f}s)" if event.deadline_ms else "",
        )
        return event

    def _event(self, kind: str, node: ClusterNode, **extra) -> SpotEvent:
        return self._record(
            SpotEvent(
                kind, node.node_id, node.node_type, time.monotonic() - self._start, time.time(), **extra
            )
        )

    def _kill(self, node: ClusterNode) -> int:
        pids = raylet_pids(self.temp_dir, node.node_id)
        signal_all(pids, signal.SIGKILL)
        return len(pids)

    def reclaim(self, node: ClusterNode) -> SpotEvent:
        """Take `node` away without notice: SIGKILL its raylet and everything the raylet started."""
        if node.is_head:
            raise SpotEventError(f"node {node.node_id} is the head; only worker nodes are spot capacity")
        self._hit.add(node.node_id)
        killed = self._kill(node)
        if not killed:
            raise SpotEventError(
                f"no raylet with --node_id={node.node_id} under {self.temp_dir}; is it gone?"
            )
        return self._event(RECLAIM, node, killed_pids=killed)

    def drain(self, node: ClusterNode, notice_s: float, message: str = "spot reclaim notice") -> SpotEvent:
        """Give `node` a reclaim notice: a PREEMPTION drain through the GCS with a deadline `notice_s` from now,
        then terminate it at the deadline (in a timer thread; `wait_for_terminations` waits for it)."""
        from ray.core.generated import autoscaler_pb2

        if node.is_head:
            raise SpotEventError(f"node {node.node_id} is the head; only worker nodes are spot capacity")
        self._hit.add(node.node_id)
        deadline_ms = int(time.time() * 1000 + notice_s * 1000)
        accepted, why = gcs_client(self.gcs_address).drain_node(
            node.node_id,
            autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON),
            message,
            deadline_ms,
            timeout=GCS_TIMEOUT_S,
        )
        if not accepted:
            raise SpotEventError(f"the GCS at {self.gcs_address} refused to drain node {node.node_id}: {why}")
        listed = draining_nodes(self.gcs_address).get(node.node_id) == deadline_ms
        timer = threading.Timer(max(0.0, deadline_ms / 1000 - time.time()), self._terminate, args=(node,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return self._event(DRAIN, node, deadline_ms=deadline_ms, listed_draining=listed)

    def _terminate(self, node: ClusterNode) -> None:
        self._event(TERMINATE, node, killed_pids=self._kill(node))  # 0: it had already gone by itself

    def wait_for_terminations(self, timeout_s: float) -> None:
        """Block until every drained node's termination has run (TimeoutError after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        for timer in list(self._timers):
            timer.join(max(0.0, deadline - time.monotonic()))
            if timer.is_alive():
                raise TimeoutError(f"a drained node's termination had not run after {timeout_s:.0f}s")

    def cancel(self) -> None:
        """Cancel terminations not yet run (their nodes stay up)."""
        for timer in self._timers:
            timer.cancel()

    def pick_target(self, pick: float) -> ClusterNode | None:
        """The worker node at index floor(pick * n) of the n running workers not hit before, by node id."""
        candidates = [node for node in worker_nodes(self.gcs_address) if node.node_id not in self._hit]
        return candidates[int(pick * len(candidates))] if candidates else None

    def inject(self, planned: PlannedEvent) -> SpotEvent:
        """Inject one planned event now; with no worker to hit (or one gone under it) it is recorded SKIPPED."""
        node = self.pick_target(planned.pick)
        if node is None:
            return self._record(
                SpotEvent(
                    SKIPPED,
                    "",
                    "",
                    time.monotonic() - self._start,
                    time.time(),
                    detail=f"no worker node up for a {planned.kind}",
                )
            )
        try:
            return self.drain(node, planned.notice_s) if planned.kind == DRAIN else self.reclaim(node)
        except SpotEventError as exc:  # e.g. the autoscaler removed the idle node a moment ago
            return self._record(
                SpotEvent(
                    SKIPPED,
                    node.node_id,
                    node.node_type,
                    time.monotonic() - self._start,
                    time.time(),
                    detail=str(exc),
                )
            )

    def run(self, plan: list[PlannedEvent], stop: threading.Event | None = None) -> list[SpotEvent]:
        """Inject `plan`'s events at their moments (counted from this call) until `stop` is set. Returns the
        events injected (drains' terminations follow at their deadlines, in `events`)."""
        stop = stop or threading.Event()
        began, injected = time.monotonic(), []
        for planned in sorted(plan, key=lambda p: p.at_s):
            if stop.wait(max(0.0, began + planned.at_s - time.monotonic())):
                break
            injected.append(self.inject(planned))
        return injected

    def timeline(self) -> list[dict]:
        """The events so far as plain dicts, in the order they happened."""
        with self._lock:
            return [asdict(event) for event in sorted(self.events, key=lambda e: e.at_s)]
