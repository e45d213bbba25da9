"""The evaluator pool's slots: one evaluator actor per slot, which slots are free, and the one way to replace one.

`EvaluatorSlots` lives inside the pool service (`pool.PoolService`) and owns everything about the evaluator
actors themselves:
- starting them (`start`) over the shared object refs (checkpoints, reference statistics);
- the free list: `acquire` a free slot (never one on a draining node), `release` it, `wake` the waiters;
- replacing the evaluator of a slot (`replace`): start a new actor, wait until it is constructed, swap it into the
  slot, retire and kill the old one, and count it. A replacement is either unplanned (the evaluator died or hung:
  `healing.py`; counted against `evaluators.max_replacements`, past which the pool stops) or planned (its node
  drains: `draining.py`; counted apart, never a failure);
- the pool's stop cause (`stop`), which every waiter sees.
Healing and draining decide *when* to replace; this object decides *how*. The pool growing and shrinking with
its cluster (between a minimum and `evaluators.num_actors`) would add and remove slots here.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.exceptions import RayActorError

from lcsc_ray.evaluator import EvaluatorActor, evaluator_options
from schemas.errors import LcscCheckfreeError
from schemas.search import SearchSpec

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 300.0  # an evaluator actor must be constructed (process, model, sampler) within this


class EvaluatorPoolError(LcscCheckfreeError):
    """The evaluator pool stopped: evaluators kept dying or hanging, or evaluations kept failing."""


class EvaluatorSlots:
    """The evaluator actors by slot index, their pids, the free list, the replacements made and the stop cause."""

    def __init__(self, spec: SearchSpec, shared: dict):
        self.spec, self.shared = (
            spec,
            shared,
        )  # shared: the placed weights and reference refs every evaluator is built over
        self.actors: list = []
        self.pids: list[int | None] = []
        self.free: list[int] = []
        self.draining: set[int] = set()  # slots whose evaluator sits on a draining node: handed nothing new
        self.retired: set[str] = set()  # actor ids a planned replacement retired: their losses are planned
        self.replacements = 0  # unplanned replacements (a lost evaluator), at most `max_replacements`
        self.drained = 0  # planned replacements (a draining node), not failures
        self.drain_tries: dict[
            tuple[int, str], int
        ] = {}  # (slot, draining node) -> planned replacements tried
        self.healing: set[asyncio.Task] = set()  # heals running beside the evaluations (kept until done)
        self.stopped: str | None = None
        self.condition = asyncio.Condition()

    # ---------------------------------------------------------------------------------------- actors
    def _new_actor(self):
        shared = self.shared
        return EvaluatorActor.options(**evaluator_options(self.spec)).remote(
            self.spec, shared["weights"], None, shared["mu"], shared["sigma"]
        )

    @staticmethod
    async def _ready(actor) -> int:
        info = await asyncio.wait_for(actor.info.remote(), READY_TIMEOUT_S)
        return int(info["pid"])

    async def start(self, count: int) -> list[int]:
        """Start `count` evaluators and wait until each is constructed; every slot is free. Returns their pids."""
        self.actors = [self._new_actor() for _ in range(count)]
        try:
            self.pids = list(await asyncio.gather(*(self._ready(actor) for actor in self.actors)))
        except (asyncio.TimeoutError, RayActorError) as exc:
            evaluators = self.spec.evaluators
            raise EvaluatorPoolError(
                f"{len(self.actors)} evaluator actors ({evaluators.num_cpus} CPU, {evaluators.num_gpus} GPU each) "
                f"did not start within {READY_TIMEOUT_S:.0f} s ({type(exc).__name__}); cluster resources: "
                f"{ray.cluster_resources()}; lower `evaluators.num_actors` or their resources"
            ) from None
        self.free = list(range(len(self.actors)))
        return self.pids

    async def restarted(self, index: int) -> bool:
        """After a death: True (and the slot free again) when Ray's own restart brought the evaluator back."""
        try:
            self.pids[index] = await self._ready(self.actors[index])
        except (asyncio.TimeoutError, RayActorError):
            return False  # dead past Ray's restarts
        await self.release(index)
        return True

    async def replace(self, index: int, cause: str, planned: bool = False) -> bool:
        """Put a new, constructed evaluator in slot `index` in place of the current one, which is killed.

        Unplanned (the evaluator was lost, its slot out of service): refused, stopping the pool, past
        `evaluators.max_replacements`; else counted, the old actor killed first (it may hold the resources the new
        one needs) and the new one put in the slot at once. Planned (a draining node): the old evaluator serves
        until the new one is up, is then retired (its candidate in flight runs again without spending an attempt)
        and killed; refused when the slot changed meanwhile (healed: the old one died first) or the pool stopped.
        Returns whether the slot holds a new evaluator; a new one that does not come up is killed and its error
        (asyncio.TimeoutError, RayActorError) raised. The slot is not released here: the caller does that."""
        if self.stopped:
            return False
        old = self.actors[index]
        if not planned and not await self._count_unplanned(index, cause):
            return False
        if not planned:
            ray.kill(old, no_restart=True)
        new = self._new_actor()
        if not planned:
            self.actors[index] = new  # a drain looking now sees the new evaluator
        try:
            pid = await self._ready(new)
        except (asyncio.TimeoutError, RayActorError):
            ray.kill(new, no_restart=True)
            raise
        if planned and (self.actors[index] is not old or self.stopped):
            ray.kill(new, no_restart=True)
            return False
        self.actors[index], self.pids[index] = new, pid
        if planned:
            self.retired.add(old._actor_id.hex())
            ray.kill(old, no_restart=True)
            self.drained += 1
        return True

    async def _count_unplanned(self, index: int, cause: str) -> bool:
        """Count one unplanned replacement of slot `index`; past the limit, stop the pool instead (False)."""
        limit = self.spec.evaluators.max_replacements
        if self.replacements >= limit:
            await self.stop(
                f"evaluators were lost {self.replacements + 1} times, more than "
                f"`evaluators.max_replacements` = {limit} allows; last: evaluator {index} {cause}"
            )
            return False
        self.replacements += 1
        log.warning(
            "replacing evaluator %d (%s); replacement %d of at most %d",
            index,
            cause,
            self.replacements,
            limit,
        )
        return True

    def is_retired(self, actor) -> bool:
        """True when a planned replacement retired `actor`: a call lost with it is no failure."""
        return actor._actor_id.hex() in self.retired

    # ------------------------------------------------------------------------------------- the free list
    def check_stopped(self) -> None:
        """Raise EvaluatorPoolError with the stop cause when the pool stopped."""
        if self.stopped:
            raise EvaluatorPoolError(self.stopped)

    async def acquire(self, avoid: dict[int, object]) -> int:
        """A free slot, preferring one whose evaluator has not failed this candidate (`avoid`: index -> the actor
        that failed it; a replacement at that index is a new actor and welcome); never one on a draining node."""
        async with self.condition:
            while True:
                self.check_stopped()
                usable = [i for i in self.free if i not in self.draining]
                choices = [i for i in usable if avoid.get(i) is not self.actors[i]]
                if not choices and len(avoid) >= len(self.actors):
                    choices = usable
                if choices:
                    self.free.remove(choices[0])
                    return choices[0]
                await self.condition.wait()

    async def release(self, index: int) -> None:
        """Give slot `index` back to the free list."""
        async with self.condition:
            if index not in self.free:
                self.free.append(index)
            self.condition.notify_all()

    async def wake(self) -> None:
        """Let waiting callers look at the free list again (a draining slot got its new evaluator)."""
        async with self.condition:
            self.condition.notify_all()

    async def stop(self, cause: str) -> None:
        """Stop the pool with `cause` (the first cause is kept); every waiter raises it."""
        if not self.stopped:
            self.stopped = cause
            log.error("evaluator pool stopped: %s", cause)
        async with self.condition:
            self.condition.notify_all()

    async def close(self) -> None:
        """Stop, cancel the heals in flight and kill every evaluator."""
        await self.stop(self.stopped or "the pool was closed")
        for task in list(self.healing):
            task.cancel()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
