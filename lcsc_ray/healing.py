"""Healing the evaluator pool after a lost evaluator, beside the evaluations.

When an evaluator dies or hangs, its candidate is retried on another evaluator at once
(`pool.PoolService._on_evaluator`), and the lost one is healed in a task of its own:
- an evaluator that died is given back to Ray's restart once;
- one that stays dead, or that hung, is replaced by a new actor over the same object refs;
- after `evaluators.max_replacements` replacements the pool stops, naming the cause.

Constructing an actor can take minutes on crowded cores, so no candidate waits for it. A closed or stopped
pool starts no new actor, and closing the pool cancels the heals in flight.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayActorError

if TYPE_CHECKING:
    from lcsc_ray.pool import PoolService

log = logging.getLogger(__name__)


def heal_beside(service: PoolService, index: int, cause: str, hung: bool) -> None:
    """Heal evaluator `index` in a task of its own; the service keeps it in `healing` until it ends."""
    task = asyncio.get_running_loop().create_task(heal(service, index, cause, hung))
    service.healing.add(task)

    def healed(done: asyncio.Task) -> None:
        service.healing.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("healing evaluator %d failed: %r", index, done.exception())

    task.add_done_callback(healed)


async def heal(service: PoolService, index: int, cause: str, hung: bool) -> None:
    """After a death: keep the evaluator if Ray restarted it; else (or when it hung) replace it with a new actor
    over the same object refs, up to `evaluators.max_replacements` in all; then it is free again."""
    if not hung:
        try:
            service.pids[index] = await service._ready(service.actors[index])
            await service._release(index)
            return
        except (asyncio.TimeoutError, RayActorError):
            pass  # dead past Ray's restarts
    while not service.stopped:  # a closed or stopped pool starts no new actor
        limit = service.spec.evaluators.max_replacements
        if service.replacements >= limit:
            await service._stop(f"evaluators were lost {service.replacements + 1} times, more than "
                                f"`evaluators.max_replacements` = {limit} allows; last: evaluator {index} {cause}")
            return
        service.replacements += 1
        ray.kill(service.actors[index], no_restart=True)
        log.warning("replacing evaluator %d (%s); replacement %d of at most %d", index, cause,
                    service.replacements, limit)
        service.actors[index] = service._new_actor()
        try:
            service.pids[index] = await service._ready(service.actors[index])
            await service._release(index)
            return
        except (asyncio.TimeoutError, RayActorError) as exc:
            cause = f"could not be replaced ({type(exc).__name__})"
