"""The evaluator pool's slots: one evaluator actor per slot, which slots are live and free, and the one way to
replace one.

`EvaluatorSlots` lives inside the pool service (`pool.PoolService`) and owns everything about the evaluator
actors themselves:
- starting them (`start`) over the shared object refs (checkpoints, reference statistics): `num_actors` are asked
  for; the pool starts once `pool_sizing.start_decision` says so (at least `min_actors` constructed) and every
  slot still waiting for room joins the pool (`live`) when its evaluator is constructed: the pool grows;
- the free list: `acquire` a free live slot (never one on a draining node), `release` it, `wake` the waiters;
- replacing the evaluator of a slot (`replace`): start a new actor, wait until it is constructed, swap it into the
  slot, retire and kill the old one, and count it. A replacement is either unplanned (the evaluator crashed or
  hung on a live node: `healing.py`; counted against `evaluators.max_replacements`, past which the pool stops) or
  planned (its node drains: `draining.py`; counted apart, never a failure). A planned replacement that is not up
  shortly before the drain's deadline hands the candidate back: the old evaluator is retired then, and the new
  one joins when placed;
- losing an evaluator with its node (`loss_of` asks the GCS; `node_lost`): the slot leaves the pool (it shrinks),
  a new evaluator is asked for in its place (on an autoscaling cluster its demand launches a node), and nothing
  is counted against `max_replacements`;
- the pool's stop cause (`stop`), which every waiter sees.
Healing and draining decide *when* to replace; this object decides *how*.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import RayActorError

from lcsc_ray.evaluator import EvaluatorActor, evaluator_options
from lcsc_ray.pool_sizing import (
    CRASHED,
    NODE_LOST,
    START_FAIL,
    START_GO,
    UNDECIDED,
    NodeView,
    final_loss_kind,
    loss_kind,
    start_decision,
)
from lcsc_ray.timeouts import NODE_LOSS_WAIT_S, READY_TIMEOUT_S, START_GRACE_S
from rayops.draining import actor_placed, actor_placement, node_liveness
from schemas.errors import LcscCheckfreeError
from schemas.search import SearchSpec

log = logging.getLogger(__name__)


def on_node(node: str | None) -> str:
    """The words " on node <hex id>" for a loss's cause, or "" when the node is not known."""
    return f" on node {node}" if node else ""


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400]


class EvaluatorPoolError(LcscCheckfreeError):
    """The evaluator pool stopped: evaluators kept dying or hanging, or evaluations kept failing."""


class EvaluatorSlots:
    """The evaluator actors by slot index, their pids, the live and free slots, the replacements made and the
    stop cause."""

    def __init__(self, spec: SearchSpec, shared: dict):
        self.spec, self.shared = (
            spec,
            shared,
        )  # shared: the placed weights and reference refs every evaluator is built over
        self.actors: list = []
        self.pids: list[int | None] = []
        self.live: set[int] = set()  # slots whose evaluator is constructed and in service
        self.waiting: dict[int, asyncio.Task] = {}  # slots whose new evaluator waits for room (joins when up)
        self.free: list[int] = []  # live slots not evaluating anything
        self.draining: set[int] = set()  # slots whose evaluator sits on a draining node: handed nothing new
        self.retired: set[str] = set()  # actor ids a planned replacement retired: their losses are planned
        self.replacements = 0  # unplanned replacements (a lost evaluator), at most `max_replacements`
        self.drained = 0  # planned replacements (a draining node), not failures
        self.node_losses = 0  # evaluators lost with their node (a reclaim), not failures
        self.joined = 0  # evaluators that joined the pool after it started (it grew)
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
    async def _ready(actor, timeout_s: float | None = READY_TIMEOUT_S) -> int:
        info = await asyncio.wait_for(actor.info.remote(), timeout_s)
        return int(info["pid"])

    async def start(self, count: int, min_count: int = 1) -> list[int | None]:
        """Ask for `count` evaluators and wait until at least `min_count` are constructed, and every one Ray placed
        within START_GRACE_S (`pool_sizing.start_decision`); the rest join when Ray places them. Returns the pids
        (None: still waiting)."""
        self.actors = [None] * count
        self.pids = [None] * count
        began = time.monotonic()
        for index in range(count):
            self._request(index)
        while True:
            self.check_stopped()
            elapsed = time.monotonic() - began
            constructing = await self._constructing() if elapsed >= START_GRACE_S else 0
            decision = start_decision(
                min_count, count, len(self.live), constructing, elapsed, START_GRACE_S, READY_TIMEOUT_S
            )
            if decision == START_GO:
                break
            if decision == START_FAIL:
                evaluators = self.spec.evaluators
                raise EvaluatorPoolError(
                    f"{len(self.live)} of the {min_count} evaluators `evaluators.min_actors` asks for "
                    f"({evaluators.num_cpus} CPU, {evaluators.num_gpus} GPU each) started within "
                    f"{READY_TIMEOUT_S:.0f} s; cluster resources: {ray.cluster_resources()}; lower "
                    "`evaluators.min_actors` or their resources, or add nodes"
                )
            async with self.condition:
                try:
                    await asyncio.wait_for(self.condition.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        self.joined = 0  # from here on, a join is growth
        return list(self.pids)

    async def _constructing(self) -> int:
        """Waiting evaluators that Ray has placed (they are being constructed), from the GCS actor table."""
        waiting = [self.actors[index] for index in list(self.waiting)]
        placed = await asyncio.gather(
            *(asyncio.to_thread(actor_placed, actor._actor_id.hex()) for actor in waiting)
        )
        return sum(placed)

    def _request(self, index: int, actor=None) -> None:
        """Put a new evaluator (`actor`, or one asked for now) in slot `index`: not live until it is constructed,
        then free."""
        actor = actor or self._new_actor()
        self.actors[index], self.pids[index] = actor, None
        task = asyncio.get_running_loop().create_task(self._join(index, actor))
        self.waiting[index] = task
        task.add_done_callback(
            lambda done: self.waiting.pop(index, None) if self.waiting.get(index) is done else None
        )

    async def _join(self, index: int, actor) -> None:
        """Wait (unbounded: on an autoscaling cluster, until a node is launched for it) until `actor` is
        constructed, then put slot `index` into service. One that dies first is asked for again: freely when
        its node was lost, else counted as an unplanned replacement."""
        try:
            pid = await self._ready(actor, timeout_s=None)
        except Exception as exc:  # noqa: BLE001 - a death, or an error from its info(): asked for again
            if self.actors[index] is not actor or self.stopped:
                return
            kind, node = await self.loss_of(actor) if isinstance(exc, RayActorError) else (CRASHED, None)
            if kind == NODE_LOST:
                self.node_losses += 1
                log.warning(
                    "evaluator %d was lost with its node%s before it started; asking for another",
                    index,
                    on_node(node),
                )
                self._request(index)
            elif await self._count_unplanned(
                index, f"failed before it started{on_node(node)} ({_one_line(exc)})"
            ):
                ray.kill(actor, no_restart=True)
                self._request(index)
            return
        if self.actors[index] is not actor or self.stopped:
            return
        self.pids[index] = pid
        self.live.add(index)
        self.joined += 1
        log.info("evaluator %d joined the pool (%d live)", index, len(self.live))
        await self.release(index)

    async def loss_of(self, actor) -> tuple[str, str | None]:
        """Why `actor` was lost (`pool_sizing.loss_kind`), asking the GCS until it knows, at most NODE_LOSS_WAIT_S;
        with the node it was on (None: not known)."""
        deadline = time.monotonic() + NODE_LOSS_WAIT_S
        kind, node = UNDECIDED, None
        while time.monotonic() < deadline:
            try:
                state, node = await asyncio.to_thread(actor_placement, actor._actor_id.hex())
                alive, draining = await asyncio.to_thread(node_liveness, node)
            except (ray.exceptions.RayError, TimeoutError, ConnectionError, OSError) as exc:
                log.warning("the GCS did not say why evaluator was lost (%s); asking again", exc)
                state, alive, draining = None, None, False
            kind = loss_kind(state, NodeView(alive, draining))
            if kind != UNDECIDED:
                break
            await asyncio.sleep(1.0)
        return final_loss_kind(kind), node

    async def node_lost(self, index: int, actor, node: str | None = None) -> None:
        """`actor`, in slot `index`, was lost with its node: the slot leaves the pool and a new evaluator is asked
        for in its place (not counted against `max_replacements`)."""
        if self.actors[index] is not actor or self.stopped:
            return  # a replacement already took the slot
        self.node_losses += 1
        self.live.discard(index)
        if index in self.free:
            self.free.remove(index)
        ray.kill(actor, no_restart=True)
        log.warning(
            "evaluator %d was lost with its node%s (not counted as a replacement); %d live, asking for another",
            index,
            on_node(node),
            len(self.live),
        )
        self._request(index)

    async def replace(
        self, index: int, cause: str, planned: bool = False, hand_back_s: float | None = None
    ) -> bool:
        """Put a new, constructed evaluator in slot `index` in place of the current one, which is killed.

        Unplanned (the evaluator was lost, its slot out of service): refused, stopping the pool, past
        `evaluators.max_replacements`; else counted, the old actor killed first (it may hold the resources the new
        one needs) and the new one put in the slot at once. Planned (a draining node): the old evaluator serves
        until the new one is up, is then retired (its candidate in flight runs again without spending an attempt)
        and killed; refused when the slot changed meanwhile (healed: the old one died first) or the pool stopped.
        With `hand_back_s` (seconds until shortly before the drain's deadline), a new evaluator not up by then
        takes the slot as waiting, and the old one is retired at once (the candidate is handed back in time).
        Returns whether the slot holds a new evaluator; a new one that does not come up is killed and its error
        (asyncio.TimeoutError, RayActorError) raised. The slot is not released here: the caller does that."""
        if self.stopped:
            return False
        old = self.actors[index]
        if not planned and not await self._count_unplanned(index, cause):
            return False
        if not planned:
            ray.kill(old, no_restart=True)
            self.live.discard(index)
        new = self._new_actor()
        if not planned:
            self.actors[index] = new  # a drain looking now sees the new evaluator
        wait_s = READY_TIMEOUT_S if hand_back_s is None else max(0.0, min(READY_TIMEOUT_S, hand_back_s))
        try:
            pid = await self._ready(new, wait_s)
        except asyncio.TimeoutError:
            if hand_back_s is not None and self.actors[index] is old and not self.stopped:
                self._retire(index, old)
                self._request(index, new)
                log.warning("evaluator %d handed its candidate back before its node's deadline", index)
                return True
            ray.kill(new, no_restart=True)
            raise
        except RayActorError:
            ray.kill(new, no_restart=True)
            raise
        if planned and (self.actors[index] is not old or self.stopped):
            ray.kill(new, no_restart=True)
            return False
        self.actors[index], self.pids[index] = new, pid
        self.live.add(index)
        if planned:
            self._retire(index, old, leaves=False)
        return True

    def _retire(self, index: int, old, leaves: bool = True) -> None:
        """Retire the drained evaluator `old` of slot `index`: a call lost with it is planned, not a failure.
        `leaves`: the slot leaves the pool until its new evaluator joins (else a new one already serves)."""
        self.retired.add(old._actor_id.hex())
        ray.kill(old, no_restart=True)
        if leaves:
            self.live.discard(index)
            if index in self.free:
                self.free.remove(index)
        self.drained += 1

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
                if not choices and len(avoid) >= len(self.live):
                    choices = usable
                if choices:
                    self.free.remove(choices[0])
                    return choices[0]
                await self.condition.wait()

    async def release(self, index: int) -> None:
        """Give slot `index` back to the free list (only a live slot: one waiting joins when constructed)."""
        async with self.condition:
            if index in self.live and index not in self.free:
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
        for task in [*self.healing, *self.waiting.values()]:
            task.cancel()
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
