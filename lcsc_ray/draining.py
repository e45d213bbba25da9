"""LCSC evaluators on draining nodes (a preemption notice) are replaced before their node goes.

The pool service (`pool.PoolService`) looks at Ray's draining nodes every DRAIN_POLL_S (`rayops.draining`, one
bounded GCS call, in a thread). Each evaluator on a draining node is replaced by a new actor over the same object
refs (Ray places no new actor on a draining node) and, once the new one is up, the old one is killed: the candidate
it was evaluating fails over to the pool's retry and is scored again elsewhere (`PoolService._on_evaluator`), and
the pool never hands out the old actor again. Planned replacements do not count against
`evaluators.max_replacements`: they are not failures.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError

from rayops.draining import DrainWatcher

if TYPE_CHECKING:
    from lcsc_ray.pool import PoolService

log = logging.getLogger(__name__)
DRAIN_POLL_S = 2.0  # seconds between looks at the draining nodes (a spot notice gives about 120 s)
MAX_TRIES = 2  # replacements of one evaluator slot per notice (a new actor placed on a draining node again)


def actor_nodes(actors: list) -> list[str | None]:
    """Each actor's node id from the GCS actor table (None when not yet placed)."""
    nodes = []
    for actor in actors:
        info = ray._private.state.state.actor_table(actor._actor_id.hex())
        nodes.append((info or {}).get("Address", {}).get("NodeID") or None)
    return nodes


async def replace_draining(service: PoolService, draining: dict[str, int],
                           nodes: list[str | None] | None = None) -> list[int]:
    """Replace every evaluator on a node in `draining` (`nodes`: each evaluator's node, looked up when None);
    returns the indices replaced. A replacement that does not come up leaves the old evaluator in place."""
    if not draining or service.stopped:
        return []
    nodes = nodes if nodes is not None else await asyncio.to_thread(actor_nodes, list(service.actors))
    replaced = []
    for index, node in enumerate(nodes):
        tries = service.drain_tries.get((index, node), 0)
        if node not in draining or tries >= MAX_TRIES:
            continue
        service.drain_tries[(index, node)] = tries + 1
        old, new = service.actors[index], service._new_actor()
        try:
            pid = await service._ready(new)
        except (asyncio.TimeoutError, RayActorError) as exc:
            log.warning("evaluator %d's node drains, and its replacement did not start (%s)", index,
                        type(exc).__name__)
            ray.kill(new, no_restart=True)
            continue
        if service.actors[index] is not old:  # healed meanwhile (the old one died first): that one stays
            ray.kill(new, no_restart=True)
            continue
        service.actors[index], service.pids[index] = new, pid
        ray.kill(old, no_restart=True)  # its candidate in flight, if any, is retried elsewhere
        log.warning("evaluator %d's node %s drains: replaced by a new evaluator before the node goes", index,
                    node[:12])
        replaced.append(index)
    service.drained += len(replaced)
    return replaced


async def watch_drains(service: PoolService, watcher: DrainWatcher | None = None) -> None:
    """The service's background task: look at the draining nodes every poll interval until the pool stops."""
    watcher = watcher or DrainWatcher(poll_every_s=DRAIN_POLL_S)
    while not service.stopped:
        draining = await asyncio.to_thread(watcher.poll)
        await replace_draining(service, draining)
        await asyncio.sleep(watcher.poll_every_s)
