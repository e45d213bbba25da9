"""A cluster's timeline while a job runs: nodes by type, joins, leaves, reclaims and drains, workers alive and
work done, against time; and its plot (`cluster_timeline.png`).

Engine-neutral: the job gives two counters, `workers_alive()` (LCSC: evaluators in the pool; CheckFree: stages
alive) and `work_done()` (trials done; steps done), and names them. A background thread polls every `poll_s`:

    timeline = ClusterTimeline(gcs_address, workers_alive, work_done, labels=("evaluators", "trials done"))
    timeline.start(); ...; timeline.stop()
    timeline.section()          # {"events": [...], "samples": [...], ...} for result.json, or None if no node changed
    timeline_png(timeline.section())   # the plot's PNG bytes

Nodes come from the GCS node table (one bounded call per poll): a node that turns up is a `join`, one that goes
is a `leave` with the GCS's reason (`reclaim` for an unexpected termination: a spot instance taken without
notice; `idle` or `preempted` for the autoscaler's own), and a drain request is a `drain` with its deadline.
Events injected by a chaos driver (`rayops.spot_events.SpotEventInjector.timeline()`) can be added as well
(`add_events`). A sample is kept only when something it shows changed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rayops.cluster_nodes import GCS_TIMEOUT_S, gcs_client

log = logging.getLogger(__name__)
MAX_SAMPLES = 5000  # a long job keeps its first samples and its last; the plot does not need more
LEAVE_REASONS = {  # NodeDeathInfo.Reason -> the timeline's word for it
    "UNEXPECTED_TERMINATION": "reclaim",
    "AUTOSCALER_DRAIN_PREEMPTED": "preempted",
    "AUTOSCALER_DRAIN_IDLE": "idle",
    "EXPECTED_TERMINATION": "stopped",
}


@dataclass(frozen=True)
class NodeState:
    """One node as the GCS holds it at one poll."""

    node_id: str
    node_type: str
    alive: bool
    leave_reason: str = ""  # a dead node's reason, in LEAVE_REASONS' words


def gcs_node_states(gcs_address: str, timeout_s: float = GCS_TIMEOUT_S) -> list[NodeState]:
    """Every node the GCS knows (alive and dead), with its autoscaler node type ("head"/"node" when it has
    none: a cluster without an autoscaler)."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    reasons = GcsNodeInfo.DESCRIPTOR.fields_by_name["death_info"].message_type.enum_types_by_name["Reason"]
    states = []
    for node_id, info in gcs_client(gcs_address).get_all_node_info(timeout=timeout_s).items():
        alive = info.state == GcsNodeInfo.ALIVE
        node_type = info.node_type_name or ("head" if info.is_head_node else "node")
        reason = "" if alive else reasons.values_by_number[info.death_info.reason].name
        states.append(NodeState(node_id.hex(), node_type, alive, LEAVE_REASONS.get(reason, reason.lower())))
    return states


def node_events(
    before: dict[str, NodeState], now: dict[str, NodeState], drains_before: set[str], drains: dict[str, int]
) -> list[dict]:
    """What changed between two polls: joins, leaves (with their reason) and new drains. Pure."""
    events = []
    for node_id, node in now.items():
        was = before.get(node_id)
        if node.alive and (was is None or not was.alive):
            events.append({"kind": "join", "node_id": node_id, "node_type": node.node_type})
        if not node.alive and was is not None and was.alive:
            events.append(
                {
                    "kind": "leave",
                    "node_id": node_id,
                    "node_type": node.node_type,
                    "reason": node.leave_reason,
                }
            )
    for node_id, deadline_ms in drains.items():
        if node_id not in drains_before:
            node_type = now[node_id].node_type if node_id in now else ""
            events.append(
                {"kind": "drain", "node_id": node_id, "node_type": node_type, "deadline_ms": deadline_ms}
            )
    return events


class ClusterTimeline:
    """Records the cluster at `gcs_address` and the job's two counters against time (see the module doc)."""

    def __init__(
        self,
        gcs_address: str,
        workers_alive: Callable[[], int],
        work_done: Callable[[], int],
        *,
        labels: tuple[str, str] = ("workers alive", "work done"),
        poll_s: float = 2.0,
        node_source: Callable[[], list[NodeState]] | None = None,
        drain_source: Callable[[], dict[str, int]] | None = None,
    ):
        from rayops.cluster_nodes import draining_nodes

        self.workers_alive, self.work_done, self.labels, self.poll_s = (
            workers_alive,
            work_done,
            labels,
            poll_s,
        )
        self.node_source = node_source or (lambda: gcs_node_states(gcs_address))
        self.drain_source = drain_source or (lambda: draining_nodes(gcs_address))
        self.started_wall = time.time()
        self._start = time.monotonic()
        self.samples: list[dict] = []
        self.events: list[dict] = []
        self._nodes: dict[str, NodeState] | None = None
        self._drains: set[str] = set()
        self._workers, self._done = 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poll(self) -> None:
        """One look at the cluster and the counters; a GCS or counter that does not answer keeps the last value."""
        t_s = round(time.monotonic() - self._start, 3)
        try:
            nodes = {node.node_id: node for node in self.node_source()}
            drains = dict(self.drain_source())
        except Exception as exc:  # noqa: BLE001 - a busy GCS: no news this time (named in the log)
            log.debug("cluster timeline: the GCS did not answer (%s)", exc)
            nodes, drains = None, None
        for name, read in (("_workers", self.workers_alive), ("_done", self.work_done)):
            try:
                setattr(self, name, int(read()))
            except Exception as exc:  # noqa: BLE001 - the job's counter is briefly unreachable: keep the last
                log.debug("cluster timeline: %s did not answer (%s)", name, exc)
        with self._lock:
            if nodes is not None:
                if (
                    self._nodes is not None
                ):  # the nodes up at the first poll are the starting point, not joins
                    for event in node_events(self._nodes, nodes, self._drains, drains):
                        self.events.append({"t_s": t_s, **event})
                self._nodes, self._drains = nodes, set(drains)
            self._sample(t_s)

    def _sample(self, t_s: float) -> None:
        alive = Counter(node.node_type for node in (self._nodes or {}).values() if node.alive)
        sample = {
            "t_s": t_s,
            "nodes": dict(sorted(alive.items())),
            "workers": self._workers,
            "done": self._done,
        }
        last = self.samples[-1] if self.samples else None
        if last is None or any(last[key] != sample[key] for key in ("nodes", "workers", "done")):
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append(sample)
            else:
                self.samples[-1] = sample

    def add_events(self, events: Iterable[dict]) -> None:
        """Events from elsewhere (a chaos driver's `timeline()`: kind, node_id, node_type, wall_time), placed
        on this timeline's clock by their wall time."""
        with self._lock:
            for event in events:
                extra = {
                    k: v for k, v in event.items() if k in ("node_id", "node_type", "deadline_ms", "detail")
                }
                t_s = round(float(event["wall_time"]) - self.started_wall, 3)
                self.events.append({"t_s": t_s, "kind": f"injected-{event['kind']}", **extra})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_s)

    def start(self) -> ClusterTimeline:
        """Poll in a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self._run, name="cluster-timeline", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, after one last look."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=GCS_TIMEOUT_S * 3)
        self.poll()

    def section(self, always: bool = False) -> dict | None:
        """The timeline as plain data for a result: None when no node joined, left or drained (a cluster of
        fixed size) unless `always`."""
        with self._lock:
            if not self.events and not always:
                return None
            return {
                "started_at": self.started_wall,
                "poll_s": self.poll_s,
                "workers_label": self.labels[0],
                "done_label": self.labels[1],
                "events": sorted(self.events, key=lambda event: event["t_s"]),
                "samples": list(self.samples),
            }


EVENT_COLOURS = {"reclaim": "tab:red", "drain": "tab:orange", "join": "tab:green", "leave": "tab:gray"}


def _event_colour(event: dict) -> str:
    kind = event["kind"].removeprefix("injected-")
    if kind == "leave":
        return EVENT_COLOURS["reclaim"] if event.get("reason") == "reclaim" else EVENT_COLOURS["leave"]
    return EVENT_COLOURS.get(kind, "tab:purple")


def timeline_png(section: dict, title: str = "cluster timeline") -> bytes:
    """cluster_timeline.png: nodes by type, workers alive and work done against time, with the events marked
    (joins green, drains orange, reclaims red, other leaves grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = section["samples"]
    times = [sample["t_s"] for sample in samples]
    types = sorted({node_type for sample in samples for node_type in sample["nodes"]})
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    for node_type in types:
        axes[0].step(times, [s["nodes"].get(node_type, 0) for s in samples], where="post", label=node_type)
    axes[0].set_ylabel("nodes")
    if types:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[1].step(times, [s["workers"] for s in samples], where="post", color="tab:blue")
    axes[1].set_ylabel(section.get("workers_label", "workers alive"))
    axes[2].step(times, [s["done"] for s in samples], where="post", color="tab:brown")
    axes[2].set_ylabel(section.get("done_label", "work done"))
    axes[2].set_xlabel("seconds")
    for event in section["events"]:
        for axis in axes:
            axis.axvline(event["t_s"], color=_event_colour(event), linewidth=0.8, alpha=0.6)
    axes[0].set_title(title)
    for axis in axes:
        axis.yaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
