"""LCSC evaluators on draining nodes (a preemption notice) are replaced before their node goes.

The pool service (`pool.PoolService`) looks at Ray's draining nodes every DRAIN_POLL_S (`rayops.draining`, one
bounded GCS call, in a thread). Every evaluator on a draining node is marked at once (`slots.draining`: the pool
hands it no new candidate, so a candidate that lost one of them never lands on the next to go) and replaced, all in
parallel, by a new actor over the same object refs (Ray places no new actor on a draining node): a planned
`EvaluatorSlots.replace`. Once a new one is up, the old one is retired and killed: the candidate it was evaluating
runs again on a new evaluator without spending one of its attempts (`PoolService._on_evaluator`), whichever path
asked for it. Planned
replacements do not count against `evaluators.max_replacements`: they are not failures. A replacement that does not
come up leaves the old evaluator in service until shortly before the deadline (HAND_BACK_MARGIN_S): then the old
one is retired (its candidate handed back, to run elsewhere) and the new one joins the pool once it is placed (on
an autoscaling cluster, on a node launched for it). A node that goes first is a node loss, not a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import RayActorError

from lcsc_ray.evaluator_slots import EvaluatorSlots
from lcsc_ray.timeouts import DRAIN_POLL_S, HAND_BACK_MARGIN_S
from rayops.draining import DrainWatcher, alive_node_ids

log = logging.getLogger(__name__)
MAX_TRIES = 2  # replacements of one evaluator slot per notice (a new actor placed on a draining node again)


def actor_nodes(actors: list) -> list[str | None]:
    """Each actor's node id from the GCS actor table (None when not yet placed)."""
    nodes = []
    for actor in actors:
        info = ray._private.state.state.actor_table(actor._actor_id.hex())
        nodes.append((info or {}).get("Address", {}).get("NodeID") or None)
    return nodes


async def replace_draining(
    slots: EvaluatorSlots, draining: dict[str, int], nodes: list[str | None] | None = None
) -> list[int]:
    """Replace every evaluator on a node in `draining` (`nodes`: each evaluator's node, looked up when None);
    returns the indices replaced. A replacement that does not come up leaves the old evaluator in place."""
    if not draining or slots.stopped:
        return []
    nodes = nodes if nodes is not None else await asyncio.to_thread(actor_nodes, list(slots.actors))
    doomed = [
        index
        for index, node in enumerate(nodes)
        # a live evaluator only: one still waiting for room has no candidate and is not placed yet
        if index in slots.live and node in draining and slots.drain_tries.get((index, node), 0) < MAX_TRIES
    ]
    if not doomed:
        return []
    slots.draining.update(doomed)  # from now on no new candidate goes to any of them
    try:
        done = await asyncio.gather(
            *(_replace_one(slots, index, nodes[index], draining[nodes[index]]) for index in doomed)
        )
    finally:
        slots.draining.difference_update(doomed)  # a new evaluator, or the old one while its node lasts
        await slots.wake()
    return [index for index, ok in zip(doomed, done) if ok]


async def _replace_one(slots: EvaluatorSlots, index: int, node: str, deadline_ms: int = 0) -> bool:
    """A planned replacement of slot `index` (on `node`, draining until `deadline_ms`, 0: none): the old evaluator
    serves until the new one is up, then is retired and killed; past HAND_BACK_MARGIN_S before the deadline it
    hands its candidate back and the new one joins the pool when placed."""
    slots.drain_tries[(index, node)] = slots.drain_tries.get((index, node), 0) + 1
    hand_back_s = deadline_ms / 1000 - time.time() - HAND_BACK_MARGIN_S if deadline_ms else None
    try:
        replaced = await slots.replace(
            index, f"its node {node} drains", planned=True, hand_back_s=hand_back_s
        )
    except (asyncio.TimeoutError, RayActorError) as exc:
        log.warning(
            "evaluator %d's node drains, and its replacement did not start (%s)", index, type(exc).__name__
        )
        return False
    if replaced:
        log.warning(
            "evaluator %d's node %s drains: replaced by a new evaluator before the node goes",
            index,
            node,
        )
    return replaced


async def drop_lost_nodes(slots: EvaluatorSlots) -> list[int]:
    """Take every live evaluator whose node the GCS no longer holds alive (a reclaim) out of the pool, asking for
    a new one in its place (`EvaluatorSlots.node_lost`), even when it was idle; returns their slots."""
    live = sorted(slots.live)
    actors = [slots.actors[index] for index in live]
    if not actors:
        return []
    nodes = await asyncio.to_thread(actor_nodes, actors)
    alive = await asyncio.to_thread(alive_node_ids)
    lost = [(i, actor, node) for i, actor, node in zip(live, actors, nodes) if node and node not in alive]
    for index, actor, node in lost:
        await slots.node_lost(index, actor, node)
    return [index for index, _, _ in lost]


async def watch_drains(slots: EvaluatorSlots, watcher: DrainWatcher | None = None) -> None:
    """The pool's background task: look at the draining nodes every poll interval until the pool stops."""
    watcher = watcher or DrainWatcher(poll_every_s=DRAIN_POLL_S)
    while not slots.stopped:
        draining = await asyncio.to_thread(watcher.poll)
        try:
            await replace_draining(slots, draining)
        except Exception as exc:  # noqa: BLE001 - named, and the next look tries again (a dead watch helps no one)
            log.error(
                "replacing the evaluators on draining nodes %s failed (%s: %s); looking again in %.1f s",
                sorted(n[:12] for n in draining),
                type(exc).__name__,
                exc,
                watcher.poll_every_s,
            )
        await asyncio.sleep(watcher.poll_every_s)


async def watch_lost_nodes(slots: EvaluatorSlots, poll_s: float = DRAIN_POLL_S) -> None:
    """The pool's background task: every `poll_s` until the pool stops, drop the live evaluators whose node is
    gone (`drop_lost_nodes`), so the pool shrinks, and asks for their replacements, even when they were idle."""
    while not slots.stopped:
        try:
            await drop_lost_nodes(slots)
        except Exception as exc:  # noqa: BLE001 - named, and the next look tries again (a dead watch helps no one)
            log.error("looking for evaluators on lost nodes failed (%s: %s)", type(exc).__name__, exc)
        await asyncio.sleep(poll_s)
