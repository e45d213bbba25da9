"""Healing the evaluator pool after a lost evaluator, beside the evaluations.

When an evaluator dies or hangs, its candidate is retried on another evaluator at once
(`pool.PoolService._on_evaluator`), and the lost one is healed in a task of its own:
- an evaluator that died or hung while its node was alive is replaced by a new actor over the same object refs
  (`EvaluatorSlots.replace`, unplanned: after `evaluators.max_replacements` of them the pool stops, naming the
  cause); Ray never restarts evaluators itself (max_restarts=0). One lost with its node is no heal's business:
  `EvaluatorSlots.node_lost` asks for a new one without counting it;
- a heal that raises something unexpected (a new evaluator's `info()` failing, say) is tried again with a new
  actor, at most HEAL_TRIES times in all; then the pool stops naming that error. A slot is never left taken.

Constructing an actor can take minutes on crowded cores, so no candidate waits for it. A closed or stopped
pool starts no new actor, and closing the pool cancels the heals in flight.
"""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import RayActorError

from lcsc_ray.evaluator_slots import EvaluatorSlots

log = logging.getLogger(__name__)
HEAL_TRIES = 3  # heals of one lost evaluator that raised something unexpected, before the pool stops


def heal_beside(
    slots: EvaluatorSlots, index: int, cause: str, hung: bool, lost: object | None = None
) -> None:
    """Heal evaluator `index` (`lost`: the actor that was lost there) in a task of its own; the slots keep it
    in `healing` until it ends."""
    task = asyncio.get_running_loop().create_task(heal_with_retries(slots, index, cause, hung, lost))
    slots.healing.add(task)

    def healed(done: asyncio.Task) -> None:
        slots.healing.discard(done)
        if not done.cancelled() and done.exception() is not None:  # heal_with_retries stops the pool first
            log.error("healing evaluator %d failed: %r", index, done.exception())

    task.add_done_callback(healed)


def describe(exc: BaseException) -> str:
    """An error in one line, with a Ray task error's own cause rather than its remote traceback."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:600]


async def heal_with_retries(
    slots: EvaluatorSlots, index: int, cause: str, hung: bool, lost: object | None = None
) -> None:
    """`heal`, tried again with a new actor when it raises something unexpected; after HEAL_TRIES such errors the
    pool stops with the last one named."""
    if lost is not None and slots.actors[index] is not lost:  # a drain already put a new evaluator there
        await slots.release(index)
        return
    error = ""
    for attempt in range(1, HEAL_TRIES + 1):
        try:
            await heal(slots, index, cause, hung)
            return
        except Exception as exc:  # noqa: BLE001 - unexpected by definition: named, retried, then the pool stops
            error = describe(exc)
            log.error("healing evaluator %d raised %s (try %d of %d)", index, error, attempt, HEAL_TRIES)
            cause, hung = (
                f"could not be healed ({error})",
                True,
            )  # its state is unknown: a new actor next time
    await slots.stop(
        f"healing evaluator {index} failed {HEAL_TRIES} times; the last error: {error}; the "
        "evaluator's process or its cluster node cannot host an evaluator (see the service's log)"
    )


async def heal(slots: EvaluatorSlots, index: int, cause: str, hung: bool) -> None:
    """After a death or a hang: replace the evaluator with a new actor over the same object refs, up to
    `evaluators.max_replacements` in all; then it is free again. (`hung` is kept for the log's sake.)"""
    while not slots.stopped:  # a closed or stopped pool starts no new actor; past the limit the pool stops
        try:
            if await slots.replace(index, cause):
                await slots.release(index)
            return
        except (asyncio.TimeoutError, RayActorError) as exc:
            cause = f"could not be replaced ({type(exc).__name__})"
