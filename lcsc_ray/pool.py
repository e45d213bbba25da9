"""The evaluator pool as one room: start it, heal it, dispatch every evaluation through it, close it.

  EvaluatorPool (the driver)  ─ starts ─►  PoolService (an async actor pinned to the driver's node)
                                              ─ owns ─►  evaluator actors (checkpoint refs, reference stats)
  Tune trials (own processes) ─┐
  rungs, final scores ─────────┴─►  PoolService.evaluate(job) ─► a free evaluator ─► one evaluation record

Every evaluation of a search goes through `PoolService.evaluate`, so one set of rules holds everywhere:
- The evaluation store is consulted first and written right after (a resumed search never repeats work).
- Every evaluation has a timeout (`evaluators.evaluation_timeout_s`, by default 5x the slowest timed
  evaluation so far, per sample, scaled by sample count, at least 60 s). A hung evaluator is killed and replaced.
- A candidate whose evaluator hung or died is retried once elsewhere, as soon as another evaluator is free;
  the lost evaluator is healed beside it (`healing.py`: a new actor over the same refs, at most
  `evaluators.max_replacements` times, after which the pool stops naming the cause).
- The pool follows its cluster (`pool_sizing.py`): it starts with at least `evaluators.min_actors` evaluators and
  grows to `evaluators.num_actors` as Ray places the rest (on an autoscaling cluster, as nodes join). An evaluator
  lost with its node (the GCS holds the node dead or draining: a spot reclaim) is routine: the pool shrinks, asks
  for a new one, and its candidate runs again elsewhere without spending an attempt or a replacement.
- An evaluator on a draining node (a preemption notice) is handed no new candidate, is replaced before the node
  goes, and its candidate in flight is run again on a new evaluator (`draining.py`); such planned replacements
  are not failures and cost the candidate no attempt, on every path (trials, rungs, final scores).
- An evaluation that raises (not a lost evaluator) is deterministic: it is not retried, its record says why,
  and after `evaluators.max_failed_evaluations` of them the pool stops with that root cause.
- A job of at least `evaluators.split_min_samples` samples is split across every evaluator: each block of
  chunks (`evaluator.tree_blocks`) runs as its own sub-evaluation under the same timeout, healing and retry
  rules, and the blocks' FID statistics merge to exactly those one evaluator computes (`merge_blocks`).
- Callers never hold an evaluator: the service does, so a trial process that dies mid-evaluation leaks
  nothing (its evaluation finishes, is recorded, and the evaluator goes back to the pool). An evaluation is no
  Ray child of its caller (`detach_from_caller`): a caller stopped with `ray.cancel` does not cancel it.
- A job asked for again while it is being evaluated (a Tune trial retried after its process died) joins that
  evaluation instead of starting a second one; a job that failed with an error gets the same failed record
  again, neither re-run nor counted twice.
The evaluator actors themselves, the free list and the one way to replace an evaluator belong to
`evaluator_slots.EvaluatorSlots`, inside the service; healing and draining decide when, through its methods.
Closing the pool kills the evaluators and the service; evaluators are owned by the service, so even a
service that dies takes them with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lcsc_ray.candidate_stats import CandidateStats, reusable_prefix
from lcsc_ray.checkpoints import CheckpointSet
from lcsc_ray.combine import check_non_float_equal
from lcsc_ray.draining import replace_draining, watch_drains, watch_lost_nodes
from lcsc_ray.evaluation_records import (
    Job,
    evaluation_record,
    evaluation_timeout,
    slowest_timing,
    stored_record,
)
from lcsc_ray.evaluation_store import EvaluationStore
from lcsc_ray.evaluator import chunk_sizes, merge_blocks, tree_blocks
from lcsc_ray.evaluator_slots import EvaluatorPoolError, EvaluatorSlots, on_node
from lcsc_ray.fid import FIDStats, fid_from_stats
from lcsc_ray.fid_extrapolation import block_bounds, fit_fid_inf, fit_points, merged
from lcsc_ray.healing import heal_beside
from lcsc_ray.pool_sizing import CRASHED, NODE_LOST, concurrency
from lcsc_ray.timeouts import READY_TIMEOUT_S
from rayops import storage
from rayops.progress import ProgressLine
from rayops.resources import check_placeable
from schemas.search import SearchSpec

__all__ = ["EvaluatorPool", "EvaluatorPoolError", "Job", "PoolService"]
log = logging.getLogger(__name__)
GUARD_POLL_S = 1.0  # while scoring, the driver looks at its output lock this often
CONCURRENCY_POLL_S = 1.0  # the driver asks the service for its live pool size at most this often
ATTEMPTS = 2  # a candidate whose evaluator hung or died is retried once elsewhere
PLANNED_RETRIES = (
    4  # runs again of one candidate whose evaluator a drain replaced (no attempt: not a failure)
)


def _root_cause(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:800]


def detach_from_caller() -> None:
    """Make the Ray calls of this asyncio task no children of the actor call that started it (Ray finds the
    parent in a context variable that the task copied). `ray.cancel` is recursive by default: without this, a
    caller cancelled with it (a stopped Tune trial) would cancel the evaluation that other callers join and
    that is recorded for the whole search."""
    task_id = getattr(ray._raylet, "async_task_id", None)  # Ray's own way out (ray.serve does the same)
    if task_id is not None:
        task_id.set(None)


@ray.remote(num_cpus=0, max_restarts=0)
class PoolService:
    """Holds the evaluator slots (`EvaluatorSlots`); every evaluation of the search passes through here."""

    def __init__(self, spec: SearchSpec, shared: dict, store: EvaluationStore | None):
        self.spec, self.store = spec, store
        # continued jobs' chunk-block statistics, beside the records (`candidate_stats`)
        self.stats = (
            None if store is None else CandidateStats(storage.join(store.uri, "stats"), store.identity)
        )
        # the evaluators, the free list, their replacements and the pool's stop cause
        self.slots = EvaluatorSlots(spec, shared)
        self.shared = shared
        self.slowest_timed: tuple[float, int] | None = None
        self.failed, self.split_jobs, self.evaluated = 0, 0, 0
        self.in_flight: dict[Job, asyncio.Task] = {}
        self.failures: dict[Job, dict] = {}  # deterministic failures of this search, by job

    async def start(self) -> list[int]:
        """Ask for `evaluators.num_actors` evaluators and wait for at least `evaluators.min_actors` of them
        (`EvaluatorSlots.start`); returns their pids (None: not yet placed, joins later)."""
        evaluators = self.spec.evaluators
        pids = await self.slots.start(evaluators.num_actors, evaluators.min_actors)
        # preemption notices: evaluators on a draining node are replaced before it goes
        self.drain_watch = asyncio.get_running_loop().create_task(watch_drains(self.slots))
        # reclaims: evaluators whose node is gone leave the pool, and new ones are asked for
        self.loss_watch = asyncio.get_running_loop().create_task(watch_lost_nodes(self.slots))
        return pids

    async def replace_draining(
        self, draining: dict[str, int], nodes: list[str | None] | None = None
    ) -> list[int]:
        """Replace the evaluators on `draining` nodes now (`draining.replace_draining`); the watcher calls it."""
        return await replace_draining(self.slots, draining, nodes)

    # -------------------------------------------------------------------------------------- evaluation
    async def evaluate(self, job: Job) -> dict:
        """The evaluation record of `job`: from the store, or evaluated on a free evaluator (see module doc)."""
        self.slots.check_stopped()
        if self.store is not None:
            stored = await asyncio.to_thread(self.store.get, job.alphas, job.num_samples, job.seed)
            # a continued job replays only a continued evaluation (its blocks kept, its FID_inf fitted)
            if (
                stored is not None
                and "fid" in stored
                and (not job.continued or stored.get("fit_points") or stored.get("status") != "ok")
            ):
                return stored_record(job, stored)
        if job in self.failures:
            return self.failures[job]
        if job not in self.in_flight:
            # a task of its own: the evaluation goes on (and is recorded) even when the caller is gone
            self.in_flight[job] = asyncio.create_task(self._evaluate(job))
            self.in_flight[job].add_done_callback(lambda _: self.in_flight.pop(job, None))
        return await asyncio.shield(self.in_flight[job])

    async def _evaluate(self, job: Job) -> dict:
        detach_from_caller()
        if job.continued:
            return await self._evaluate_continued(job)
        blocks = self._split_blocks(job)
        if blocks:
            return await self._evaluate_split(job, blocks)
        alphas = None if job.alphas is None else list(job.alphas)
        outcome, value, index, attempt = await self._on_evaluator(
            lambda actor: actor.evaluate.remote(alphas, job.num_samples, job.seed, raise_nonfinite=False),
            job.num_samples,
        )
        if outcome == "error":
            return await self._failed(job, value, index, attempt)
        if outcome == "lost":
            return evaluation_record(job, math.inf, "failed", value, attempts=ATTEMPTS)
        return await self._finished(job, value, index, attempt)

    async def _on_evaluator(self, submit, num_samples: int) -> tuple[str, object, int, int]:
        """Run `submit(actor)` on a free evaluator, retried once elsewhere when that evaluator hangs or dies.
        Returns ('done', output, index, attempt), ('error', root cause, index, attempt) when the call raised,
        or ('lost', reasons, -1, ATTEMPTS) when both attempts lost their evaluator. A loss to a drain's planned
        replacement (`slots.is_retired`) is no attempt: the call runs again, on the slot's new evaluator or another."""
        avoid: dict[int, object] = {}
        reasons: list[str] = []
        attempt, planned = 1, 0
        while attempt <= ATTEMPTS:
            index = await self.slots.acquire(avoid)
            actor = self.slots.actors[index]
            timeout = evaluation_timeout(
                num_samples, self.spec.evaluators.evaluation_timeout_s, self.slowest_timed
            )
            try:
                out = await asyncio.wait_for(submit(actor), timeout)
            except asyncio.TimeoutError:
                reason, cause, hung = (
                    f"did not finish within {timeout:.0f} s",
                    f"hung for {timeout:.0f} s",
                    True,
                )
            except RayActorError as exc:
                if self.slots.is_retired(actor) and planned < PLANNED_RETRIES:
                    planned += 1
                    await self.slots.release(index)  # the slot already holds the new evaluator
                    continue
                kind, node = await self.slots.loss_of(actor) if planned < PLANNED_RETRIES else (CRASHED, None)
                if kind == NODE_LOST:
                    planned += 1  # lost with its node: routine, no attempt spent, the slot asks for another
                    await self.slots.node_lost(index, actor, node)
                    continue
                reason = cause = f"died ({type(exc).__name__}){on_node(node)}"
                hung = False
            except RayTaskError as exc:  # the evaluation itself raised: the same error would recur anywhere
                await self.slots.release(index)
                return "error", _root_cause(exc), index, attempt
            except TaskCancelledError:  # cancelled from outside the pool: no attempt spent, the slot kept
                await self.slots.release(index)
                if planned < PLANNED_RETRIES:
                    planned += 1
                    continue
                reasons.append(f"evaluator {index} had its call cancelled (ray.cancel)")
                break
            except BaseException:  # the service's own task cancelled (the pool closing): the slot goes back
                await self.slots.release(index)
                raise
            else:
                await self.slots.release(index)
                return "done", out, index, attempt
            reasons.append(f"evaluator {index} {reason}")
            avoid[index] = actor
            heal_beside(self.slots, index, cause, hung=hung, lost=actor)
            attempt += 1
        return "lost", "; ".join(reasons), -1, ATTEMPTS

    def _split_blocks(self, job: Job) -> list[tuple[int, int]]:
        """The chunk blocks a job is split into across the evaluators, or [] when it runs on one."""
        evaluators = self.spec.evaluators
        if evaluators.split_min_samples is None or job.num_samples < evaluators.split_min_samples:
            return []
        blocks = tree_blocks(
            len(chunk_sizes(job.num_samples, evaluators.batch_size)), max(1, len(self.slots.live))
        )
        return blocks if len(blocks) > 1 else []

    async def _score_blocks(
        self, job: Job, blocks: list[tuple[int, int]], sizes: list[int]
    ) -> tuple[list, dict | None]:
        """Score each block [lo, hi) of the job's chunks on an evaluator, all at once: (outcomes, None), or
        (outcomes, the job's failed record) when one raised or was lost past its retries."""
        alphas = None if job.alphas is None else list(job.alphas)

        def submit(lo: int, hi: int):
            return lambda actor: actor.evaluate_stats.remote(
                alphas, job.seed, list(range(lo, hi)), job.num_samples, raise_nonfinite=False
            )

        outcomes = await asyncio.gather(
            *(self._on_evaluator(submit(lo, hi), sum(sizes[lo:hi])) for lo, hi in blocks)
        )
        for outcome, value, index, attempt in outcomes:
            if outcome == "error":
                return outcomes, await self._failed(job, value, index, attempt)
        lost = [value for outcome, value, _, _ in outcomes if outcome == "lost"]
        if lost:
            return outcomes, evaluation_record(job, math.inf, "failed", "; ".join(lost), attempts=ATTEMPTS)
        return outcomes, None

    async def _evaluate_split(self, job: Job, blocks: list[tuple[int, int]]) -> dict:
        """One job as blocks of chunks on several evaluators at once; their statistics merged exactly."""
        self.split_jobs += 1
        start = time.perf_counter()
        sizes = chunk_sizes(job.num_samples, self.spec.evaluators.batch_size)
        outcomes, failed = await self._score_blocks(job, blocks, sizes)
        if failed is not None:
            return failed
        attempt = max(outcome[3] for outcome in outcomes)
        if any(outcome[1].get("nonfinite") for outcome in outcomes):
            out = {"fid": math.inf, "nonfinite": True}
        else:
            stats = merge_blocks(
                len(sizes),
                {block: FIDStats.from_dict(outcome[1]) for block, outcome in zip(blocks, outcomes)},
            )
            mu, sigma = await self._reference()
            out = {"fid": fid_from_stats(stats, mu, sigma), "nonfinite": False}
        out["timings"] = {"total_s": time.perf_counter() - start}
        return await self._finished(job, out, -1, attempt, timed=False)

    async def _evaluate_continued(self, job: Job) -> dict:
        """A job scored in chunk blocks that continue the candidate's stored ones (a promotion draws only its
        increment), its blocks kept, and FID_inf fitted from its halves and quarters (`fid_extrapolation`)."""
        start = time.perf_counter()
        batch = self.spec.evaluators.batch_size
        sizes = chunk_sizes(job.num_samples, batch)
        stored = await asyncio.to_thread(self.stats.load, job.alphas, job.seed, batch) if self.stats else {}
        reused = reusable_prefix(stored, sizes, batch)
        done = max((hi for _, hi in reused), default=0)
        cuts = [c for c in block_bounds(len(sizes), [lo for lo, _ in reused] + [done]) if c >= done]
        new = list(itertools.pairwise(cuts))
        outcomes, failed = await self._score_blocks(job, new, sizes)
        if failed is not None:
            return failed
        attempt = max((outcome[3] for outcome in outcomes), default=1)
        drawn = sum(sizes[done:])
        timings = {"total_s": time.perf_counter() - start}
        if any(outcome[1].get("nonfinite") for outcome in outcomes):
            out = {"fid": math.inf, "nonfinite": True, "timings": timings}
            return await self._finished(job, out, -1, attempt, False, {"samples_drawn": drawn})
        blocks = {**reused, **{b: FIDStats.from_dict(o[1]) for b, o in zip(new, outcomes)}}
        mu, sigma = await self._reference()
        points = fit_points(blocks, len(sizes), mu, sigma)
        fit = fit_fid_inf(points)
        if self.stats is not None and len(sizes) > max((hi for _, hi in stored), default=0):
            await asyncio.to_thread(self.stats.save, job.alphas, job.seed, batch, blocks)
        out = {"fid": fid_from_stats(merged(blocks, 0, len(sizes)), mu, sigma), "timings": timings}
        extra = {
            "fid_inf": fit[0] if fit else math.nan,
            "fid_slope": fit[1] if fit else math.nan,
            "fit_points": [list(p) for p in points],
            "samples_drawn": drawn,
        }
        return await self._finished(job, out, -1, attempt, False, extra)

    async def _reference(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "reference"):
            mu, sigma = self.shared["mu"], self.shared["sigma"]
            self.reference = (
                await mu if isinstance(mu, ray.ObjectRef) else mu,
                await sigma if isinstance(sigma, ray.ObjectRef) else sigma,
            )
        return self.reference

    async def _finished(
        self, job: Job, out: dict, index: int, attempt: int, timed: bool = True, extra: dict | None = None
    ) -> dict:
        eval_s = float(out["timings"]["total_s"])
        if timed:  # a split job's wall time is no single evaluator's
            self.slowest_timed = slowest_timing(self.slowest_timed, eval_s, job.num_samples)
        if out.get("nonfinite") or not math.isfinite(float(out["fid"])):
            record = evaluation_record(
                job,
                math.inf,
                "nonfinite",
                "combined weights or samples hold NaN/inf",
                index,
                eval_s,
                attempt,
                extra=extra,
            )
        else:
            record = evaluation_record(job, float(out["fid"]), "ok", "", index, eval_s, attempt, extra=extra)
        if self.store is not None:
            await asyncio.to_thread(self.store.put, job.alphas, job.num_samples, job.seed, record)
        self.evaluated += 1
        return record

    async def _failed(self, job: Job, reason: str, index: int, attempt: int) -> dict:
        self.failed += 1
        limit = self.spec.evaluators.max_failed_evaluations
        if self.failed >= limit:
            await self.slots.stop(
                f"{self.failed} evaluations failed with an error (`evaluators.max_failed_evaluations`"
                f" = {limit}); the last: {reason}"
            )
        self.failures[job] = evaluation_record(job, math.inf, "failed", reason, index, attempts=attempt)
        return self.failures[job]

    # ------------------------------------------------------------------------------------------ facts
    async def state(self) -> dict:
        """Replacements (unplanned), drains and node losses (planned), failures, the stop cause, the live pool
        size, evaluations done, evaluator pids and the current timeout rule."""
        slots = self.slots
        return {
            "replacements": slots.replacements,
            "failed": self.failed,
            "stopped": slots.stopped,
            "split_jobs": self.split_jobs,
            "drained": slots.drained,
            "node_losses": slots.node_losses,
            "joined": slots.joined,
            "live": len(slots.live),
            "evaluated": self.evaluated,
            "pids": list(slots.pids),
            "slowest_timed": self.slowest_timed,
            "num_evaluators": len(slots.actors),
        }

    async def evaluators(self) -> list:
        """The current evaluator handles (for tests and fault injection)."""
        return list(self.slots.actors)

    async def close(self) -> None:
        """Kill every evaluator this pool started."""
        await self.slots.close()


def _last_checkpoint(checkpoint_set: CheckpointSet) -> np.ndarray:
    """The last checkpoint's flat array, as its placement combines it (coefficients 0, ..., 0, 1)."""
    out = torch.empty(checkpoint_set.layout.numel, dtype=torch.float32)
    placed = checkpoint_set.placed()
    placed.checkpoints.combine_into(out, [0.0] * (len(checkpoint_set) - 1) + [1.0])
    return out.numpy()


class EvaluatorPool:
    """The driver's side of the pool: starts the service and its evaluators, probes, scores, closes."""

    _live: int | None = None  # the live pool size last asked of the service (`concurrency`), and when
    _live_at: float = -math.inf

    def __init__(
        self,
        spec: SearchSpec,
        checkpoint_set: CheckpointSet,
        reference: tuple[np.ndarray, np.ndarray],
        store: EvaluationStore | None = None,
        guard: Callable[[], None] | None = None,
    ):
        """`guard` (the search's `OutputLock.check`) is called while `score` waits: when it raises, so does
        `score`, and the driver stops (closing the pool ends the service's own writes)."""
        self.guard = guard or (lambda: None)
        # the object-store weights (`node` placement, post-hoc EMA snapshots); other placements check their own
        weights = ray.get([*checkpoint_set.refs, *checkpoint_set.extra_refs], timeout=READY_TIMEOUT_S)
        names = [*checkpoint_set.names] if checkpoint_set.refs else [checkpoint_set.names[-1]]
        if checkpoint_set.extra_refs and not checkpoint_set.refs:  # against the last checkpoint, as placed
            weights = [_last_checkpoint(checkpoint_set), *weights]
        if weights:
            check_non_float_equal(checkpoint_set.layout, weights, [*names, *checkpoint_set.extra_names])
        self.spec, self.checkpoints = spec, checkpoint_set
        shared = {
            "weights": checkpoint_set.placed(),  # where the set is kept: every evaluator combines through it
            "mu": ray.put(np.asarray(reference[0])),
            "sigma": ray.put(np.asarray(reference[1])),
        }
        evaluators = spec.evaluators
        # the pool starts with what fits: at least `min_actors` must ever fit; the rest join when Ray places them
        check_placeable(
            [{"CPU": evaluators.num_cpus, "GPU": evaluators.num_gpus}] * evaluators.min_actors,
            "the evaluator actors",
            "`evaluators.min_actors`, `evaluators.num_cpus` or `evaluators.num_gpus`",
        )
        node = ray.get_runtime_context().get_node_id()
        # pinned to the driver's node: the search can survive losing an evaluator's node, not the service's
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        self.service = PoolService.options(scheduling_strategy=strategy).remote(spec, shared, store)
        self.closed = False
        try:
            self.pids = ray.get(self.service.start.remote(), timeout=READY_TIMEOUT_S + 60)
        except BaseException:
            self.close()
            raise

    def wait_s(self, num_samples: int) -> float:
        """How long a caller waits for one job: both attempts, each with a replacement, and a queue turn."""
        state = self.state()
        timeout = evaluation_timeout(
            num_samples, self.spec.evaluators.evaluation_timeout_s, state["slowest_timed"]
        )
        return 2 * ATTEMPTS * (timeout + READY_TIMEOUT_S)

    def state(self) -> dict:
        """PoolService.state()."""
        return ray.get(self.service.state.remote(), timeout=60)

    def concurrency(self) -> int:
        """Candidates to keep in flight now: one per live evaluator (`pool_sizing.concurrency`), asked of the
        service at most every CONCURRENCY_POLL_S (Tune asks the searcher many times a second)."""
        now = time.monotonic()
        if now >= self._live_at + CONCURRENCY_POLL_S:
            try:
                self._live = int(ray.get(self.service.state.remote(), timeout=10)["live"])
            except (RayActorError, GetTimeoutError):
                self._live = self._live or self.spec.evaluators.num_actors
            self._live_at = now
        return concurrency(self.spec.evaluators.num_actors, self._live)

    def score(self, jobs: Sequence[Job], progress: ProgressLine | None = None) -> list[dict]:
        """The evaluation record of each job (identical jobs evaluated once), in order; the pool spreads
        them over its evaluators. Raises EvaluatorPoolError when the pool stopped."""
        unique = list(dict.fromkeys(jobs))
        pending = {self.service.evaluate.remote(job): job for job in unique}
        records: dict[Job, dict] = {}
        bound = self.wait_s(max(job.num_samples for job in unique)) if unique else 0.0
        while pending:
            done = self._wait_one(list(pending), bound)
            job = pending.pop(done[0])
            try:
                records[job] = ray.get(done[0], timeout=max(bound, 60.0))  # ready: only its fetch is left
            except RayTaskError as exc:
                raise EvaluatorPoolError(_root_cause(exc).removeprefix("EvaluatorPoolError: ")) from None
            if progress is not None:
                progress.update(advance=sum(1 for j in jobs if j == job))
        return [records[job] for job in jobs]

    def _wait_one(self, pending: list, bound: float) -> list:
        """The first of `pending` to finish, waited for at most `bound` s; the guard is called every GUARD_POLL_S."""
        deadline = time.monotonic() + bound
        while True:
            self.guard()
            left = deadline - time.monotonic()
            done, _ = ray.wait(pending, num_returns=1, timeout=max(0.0, min(GUARD_POLL_S, left)))
            if done:
                return done
            if left <= GUARD_POLL_S:
                raise EvaluatorPoolError(
                    f"no evaluation finished within {bound:.0f} s; pool state: {self.state()}"
                )

    def probe(self, num_samples: int, seed: int, continued: bool = False) -> dict:
        """Score the last checkpoint once before the search starts: the sampler's signature, the feature
        dimension against the reference's and a finite FID are checked, and its time sets the default timeout
        (`continued`: as the search's own jobs, so that its trial replays it)."""
        job = Job.of(np.eye(len(self.checkpoints))[-1], num_samples, seed, continued)
        record = self.score([job])[0]
        last = self.checkpoints.names[-1]
        if record["status"] == "failed":
            raise EvaluatorPoolError(
                f"the probe evaluation of the last checkpoint ({last}) failed before the "
                f"search started: {record['reason']}"
            )
        if record["status"] != "ok":
            raise EvaluatorPoolError(
                f"the last checkpoint ({last}) scores a non-finite FID ({record['reason']}); "
                "check the sampler (`sampler.target`, `sampler.nfe`) and the checkpoints"
            )
        return record

    def close(self) -> None:
        """Kill the evaluators and the service (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            ray.get(self.service.close.remote(), timeout=60)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("evaluator pool did not close cleanly (%s); killing its service", type(exc).__name__)
        ray.kill(self.service, no_restart=True)
