"""Preemption notices: a watcher of Ray's draining nodes, and the exact hand-off of a stage whose node drains.

Ray marks a node as draining, with a deadline, on `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
--deadline-remaining-seconds N` (what `cluster/spot_drain.py` runs on an AWS spot notice and KubeRay's preStop hook
on an eviction). Between two steps the coordinator asks the watcher (one bounded GCS call at most every
`recovery.drain_poll_s`) which nodes drain; each stage on such a node has its whole state (weights, Adam moments
and step, lr) copied to a standby actor on another node, which takes the stage's place. No step is lost and no
state changes, so the losses equal those of a run that had no notice.

When the deadline leaves less time than the copy needs (`decide`: the state's bytes over the copy rate measured
at earlier hand-offs, plus a fixed cost, with a safety factor), or the hand-off fails (a stage or the node dies
during it, no standby off the draining nodes), the stage stays where it is; once its node goes it is recovered by
the run's strategy (CheckFree, CheckFree+, checkpoint) as any lost stage, and its failure record says why
(`reason_for_loss`: 'drain_deadline_short' or 'drain_handoff_failed').
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import torch

from checkfree_ray.model import Embedding, Head, ModelConfig, Stage
from rayops.draining import GCS_TIMEOUT_S, DrainWatcher
from schemas.train_result import FailureRecord

if TYPE_CHECKING:
    from checkfree_ray.saving import CheckpointSaver
    from checkfree_ray.stage_group import StageGroup

log = logging.getLogger(__name__)

# Copy-rate prior until a hand-off has been measured: a conservative cross-node rate through the object store
# (serialise, transfer, load), and the fixed cost of taking a warm standby and configuring it. A cold actor
# costs a process start on top (2.9 s measured on a quiet 2-core node; doubled for loaded nodes).
PRIOR_RATE_BYTES_S, WARM_FIXED_S, COLD_START_S = 50e6, 1.0, 6.0
SAFETY_FACTOR, MARGIN_S = 2.0, 1.0  # the hand-off must fit twice over, plus a second, before the deadline
MAX_TRIES = 3  # hand-off attempts per stage and notice


@dataclass(frozen=True)
class Decision:
    """Whether to hand a stage off now, and why (`reason` is a FailureRecord reason)."""

    handoff: bool
    reason: str  # 'drain' or 'drain_deadline_short'
    remaining_s: float | None  # None: the drain has no deadline
    estimate_s: float


def copy_estimate_s(state_bytes: int, rate_bytes_s: float, warm: bool) -> float:
    """Seconds a hand-off of `state_bytes` should take: a fixed cost (and a process start when no standby is up or
    starting) plus the bytes at the copy rate."""
    return WARM_FIXED_S + (0.0 if warm else COLD_START_S) + state_bytes / rate_bytes_s


def decide(deadline_ms: int, now_ms: float, state_bytes: int, rate_bytes_s: float, warm: bool) -> Decision:
    """Hand off when the drain has no deadline (0) or when SAFETY_FACTOR x the estimate, plus MARGIN_S, fits in
    the time left; else leave the stage to the run's recovery ('drain_deadline_short')."""
    estimate = copy_estimate_s(state_bytes, rate_bytes_s, warm)
    if deadline_ms <= 0:
        return Decision(True, "drain", None, estimate)
    remaining = (deadline_ms - now_ms) / 1000.0
    fits = SAFETY_FACTOR * estimate + MARGIN_S <= remaining
    return Decision(fits, "drain" if fits else "drain_deadline_short", remaining, estimate)


@functools.lru_cache(maxsize=64)
def stage_state_bytes(cfg: ModelConfig, stage_index: int) -> int:
    """Bytes of one stage's state as a hand-off copies it: fp32 weights plus Adam's two moments (3x the
    parameters); built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        modules = [Stage(cfg)]
        if stage_index == 0:
            modules.append(Embedding(cfg))
        if stage_index == cfg.num_stages - 1:
            modules.append(Head(cfg))
    params = sum(p.numel() for module in modules for p in module.parameters())
    return 3 * 4 * params


class HandoffFailed(Exception):
    """A hand-off that could not complete; the stage stays in place and is recovered once lost."""


def hand_off(
    group: StageGroup,
    saver: CheckpointSaver | None,
    stage: int,
    avoid_nodes: frozenset[str],
    wait_s: float | None = None,
) -> tuple[float, int, bool]:
    """Move `stage` to a standby off `avoid_nodes`, between two steps: its exact state (weights, Adam, lr) is
    copied, the new actor takes its place and the old one is killed. Returns (copy seconds, bytes, warm).

    With no standby off the draining nodes, a new actor in a one-bundle group of its own: room on a live node, or
    a node the autoscaler launches for it, within `wait_s` (default: the step timeout).

    Raises `HandoffFailed` (and leaves `group.actors` unchanged) when no actor off the draining nodes could be had
    in time or a stage died meanwhile."""
    if saver is not None and saver.pending is not None:
        saver.finish(
            wait_s=group.step_timeout()
        )  # the old stage finishes writing its shard of the save first
    old = group.actors[stage]
    wait_s = group.step_timeout() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    # A standby still starting gets half the time: it may be waiting for a node, or sit in a bundle on the draining
    # node itself; then a new actor in a bundle of its own, placed off the draining nodes, gets the rest.
    actor, warm = group.pool.take(avoid_nodes=avoid_nodes, own_bundle=True, wait_s=wait_s / 2)
    try:
        try:
            info = ray.get(actor.ping.remote(), timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise HandoffFailed(
                f"no node off the draining ones took a new actor within {wait_s:.0f}s"
            ) from None
        group.pool.note_node(actor, info)
        if info["node_id"] in avoid_nodes:
            raise HandoffFailed("the only actor to be had sits on a draining node")
        started = time.monotonic()
        state = old.get_state.remote(include_optim=True)
        ray.get(actor.configure.remote(stage, None, state), timeout=group.step_timeout())
        copy_s = time.monotonic() - started
        group.replace(stage, actor)
        group.sync_replicas()  # CheckFree+ copies and redundant backups involving the new actor
    except (ray.exceptions.RayError, HandoffFailed) as exc:
        group.replace(stage, old)
        group.pool.release(actor)  # with its own bundle, so no node is launched for it after all
        group.pool.refill_standby()  # the recovery that follows the stage's loss finds a standby again
        raise HandoffFailed(str(exc)) from None
    ray.kill(old, no_restart=True)
    group.pool.refill_standby()
    return copy_s, stage_state_bytes(group.cfg, stage), warm


class DrainHandler:
    """The coordinator's look before each step (`before_step`, one of the executor's `before_step` hooks): hands
    off the stages on draining nodes, and remembers why a stage was not handed off so its later loss is recorded with that reason."""

    def __init__(
        self,
        watcher: DrainWatcher,
        locate: Callable[[list], list[str | None]] | None = None,
        wall_clock_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ):
        self.watcher, self.wall_clock_ms = watcher, wall_clock_ms
        self.locate = locate or self._ping_nodes
        self.rate_bytes_s = PRIOR_RATE_BYTES_S
        self.pending_reasons: dict[int, str] = {}  # stage -> why it was not handed off
        self.tries: dict[tuple[int, str], int] = {}  # (stage, node) -> hand-off attempts
        self._nodes: dict[str, str] = {}  # actor id -> node id

    @classmethod
    def for_spec(cls, spec) -> DrainHandler | None:
        """The handler of a run (None when `recovery.drain_poll_s` is None)."""
        poll = spec.recovery.drain_poll_s
        return None if poll is None else cls(DrainWatcher(poll_every_s=poll))

    def _ping_nodes(self, actors: list) -> list[str | None]:
        """Each actor's node id (asked once per actor, bounded; None for one that does not answer)."""
        for actor in actors:
            key = actor._actor_id.hex()
            if key not in self._nodes:
                try:
                    self._nodes[key] = ray.get(actor.ping.remote(), timeout=GCS_TIMEOUT_S)["node_id"]
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    continue
        return [self._nodes.get(actor._actor_id.hex()) for actor in actors]

    def prepare(self, cfg: ModelConfig) -> None:
        """Size each stage's state once at the start (the first sizing imports parts of torch, seconds on a loaded
        node), so that a notice's short deadline is not spent on it."""
        for stage in range(cfg.num_stages):
            stage_state_bytes(cfg, stage)

    def avoid_nodes(self) -> frozenset[str]:
        """The nodes draining at the last look (no new GCS call): no replacement goes there."""
        return frozenset(self.watcher.last)

    def reason_for_loss(self, stage: int) -> str | None:
        """Why a lost stage had not been handed off despite its node's notice (once; None if it had no notice)."""
        return self.pending_reasons.pop(stage, None)

    def before_step(self, group: StageGroup, saver: CheckpointSaver | None, step: int) -> None:
        """Before `step`: hand off each stage of `group` whose node drains (at most `MAX_TRIES` per notice)."""
        draining = self.watcher.poll()
        if not draining:
            return
        avoid = frozenset(draining)
        due = [
            (stage, node)
            for stage, node in enumerate(self.locate(list(group.actors)))
            if node in draining and self.tries.get((stage, node), 0) < MAX_TRIES
        ]
        # Several stages to move: start the actors they lack all at once, not one process start after another.
        group.pool.start_spares(len(due))
        try:
            for stage, node in due:
                self._handle(group, saver, step, stage, (node, draining[node]), avoid)
        finally:
            group.pool.trim_standbys()

    def _handle(
        self,
        group: StageGroup,
        saver: CheckpointSaver | None,
        step: int,
        stage: int,
        notice: tuple[str, int],
        avoid: frozenset[str],
    ) -> None:
        """Hand `stage` off its draining node (`notice`: node id, deadline in ms) when `decide` says it fits, and
        record the hand-off; else remember why it was not handed off."""
        node, deadline_ms = notice
        if (stage, node) not in self.tries:
            group.node_event(
                "drain_notice",
                stage,
                node,
                step=step,
                deadline=deadline_ms / 1000.0 if deadline_ms > 0 else None,
            )
        decision = decide(
            deadline_ms,
            self.wall_clock_ms(),
            stage_state_bytes(group.cfg, stage),
            self.rate_bytes_s,
            # a standby still starting counts as warm: it started at the notice, before the hand-offs ahead of
            # this one, and a hand-off whose actor is not up in time fails before the deadline, then recovers
            group.pool.has_standby(),
        )
        if not decision.handoff:
            log.warning(
                "step %d: stage %d's node drains in %.1fs, less than the hand-off needs (%.1fs x %.0f + "
                "%.0fs); it will be recovered by `recovery.strategy` once lost",
                step,
                stage,
                decision.remaining_s,
                decision.estimate_s,
                SAFETY_FACTOR,
                MARGIN_S,
            )
            self.pending_reasons[stage] = decision.reason
            self.tries[(stage, node)] = MAX_TRIES
            group.node_event("handoff_failed", stage, node, step=step, reason=decision.reason)
            return
        self.tries[(stage, node)] = self.tries.get((stage, node), 0) + 1
        started = time.monotonic()
        wait_s = group.pool.node_wait_s
        if decision.remaining_s is not None:  # a new node is of no use after the deadline
            wait_s = max(1.0, min(wait_s, decision.remaining_s - MARGIN_S - decision.estimate_s))
        try:
            copy_s, nbytes, was_warm = hand_off(group, saver, stage, avoid, wait_s=wait_s)
        except HandoffFailed as exc:
            log.warning("step %d: hand-off of stage %d off its draining node failed (%s)", step, stage, exc)
            self.pending_reasons[stage] = "drain_handoff_failed"
            group.node_event("handoff_failed", stage, node, step=step, reason="drain_handoff_failed")
            return
        self.pending_reasons.pop(stage, None)
        self.rate_bytes_s = nbytes / max(copy_s, 1e-3)  # the measured rate, for the next decision
        costs = group.history.costs
        costs["handoffs"] = costs.get("handoffs", 0.0) + 1
        costs["handoff_s_total"] = costs.get("handoff_s_total", 0.0) + time.monotonic() - started
        group.history.failures.append(
            FailureRecord(
                step=step,
                stage=stage,
                method="handoff",
                detection_s=0.0,
                recovery_s=time.monotonic() - started,
                warm_standby=was_warm,
                phase="before_step",
                reason="drain",
            )
        )
        group.node_event(
            "handoff",
            stage,
            group.node_of(stage),
            step=step,
            from_node_id=node,
            warm_standby=was_warm,
            before_deadline_s=(deadline_ms - self.wall_clock_ms()) / 1000.0 if deadline_ms > 0 else None,
        )
        log.info(
            "step %d: stage %d handed off its draining node in %.3fs (%d bytes)",
            step,
            stage,
            time.monotonic() - started,
            nbytes,
        )
