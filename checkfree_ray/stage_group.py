"""The run's stage actors as one group: the actors in stage order, their pool (placement group, standbys), the
transport between them, and what each strategy keeps in step beside the stages' own state.

Recovery (`stage_recovery.py`) and hand-offs (`draining.py`) receive this group, not the executor: they take a
replacement from the pool, `replace` a stage's actor, `load` a checkpoint and `sync_replicas`; the executor owns
one group and drives the steps through it.

Replicas: CheckFree+'s (de)embedding copies on the swap partners, and the redundant strategy's backups (stage i
holds stage i+1's whole state, weights, Adam and lr, tagged with the step that state is at). A step commits on
every stage with every copy and backup, or is not committed (torchft's "should_commit"): a stage lost while they
are made (`commit_replicas`) is a loss in the step's optimizer phase, every stage having stepped, so the executor
rolls the step forward (a rebuild of that same step) or runs it again; the step is never recorded while a backup
of it is missing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray

from checkfree_ray.liveness import StageLost, phase_of, stuck_stages, unanswering
from checkfree_ray.model_config import ModelConfig
from checkfree_ray.pool import StagePool
from checkfree_ray.recovery_rules import EMBED, HEAD
from checkfree_ray.timeouts import CONFIGURE_TIMEOUT_S, CONNECT_TIMEOUT_S, FETCH_TIMEOUT_S, PING_TIMEOUT_S
from checkfree_ray.transport import Transport, may_be_direct, open_transport
from schemas.errors import RecoveryError
from schemas.train import TrainSpec

if TYPE_CHECKING:
    from checkfree_ray.checkpoint_store import Checkpoint
    from checkfree_ray.history import History

log = logging.getLogger(__name__)


class StageGroup:
    """The S stage actors of a run (in stage order) with their pool and transport; `state_step` is the step
    their weights are at (it tags the redundant backups) and `grad_norms` each stage's last committed gradient
    norms (CheckFree's recovery weights)."""

    def __init__(
        self,
        spec: TrainSpec,
        cfg: ModelConfig,
        strategy: str,
        history: History,
        step_timeout: Callable[[], float],
    ):
        self.spec, self.cfg, self.strategy, self.S = spec, cfg, strategy, spec.pipeline.num_stages
        self.history = history  # where the copies' and backups' costs are counted
        self.step_timeout = step_timeout  # seconds a step (or a recovery's wait) may take, as measured so far
        self.pool: StagePool | None = None
        self.transport = Transport()  # the object store until `start` picks `pipeline.activation_transport`
        self.actors: list = []
        self.state_step = 0
        self.grad_norms: list[dict[str, float]] = [{"blocks": 0.0, "stage": 0.0} for _ in range(self.S)]
        self.pending_copies: list | None = None  # CheckFree+ copies submitted with the step in flight
        self._abandoned: list = []  # calls of an interrupted attempt

    # ----- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stage actors in their placement group and open the transport between them."""
        self.pool = StagePool(self.spec, self.cfg, direct_transport=may_be_direct(self.spec))
        self.actors = self.pool.start_stages()
        self.transport = open_transport(self.spec, self.actors, timeout_s=CONNECT_TIMEOUT_S)

    def configure(self, lr: float, states: list) -> None:
        """Give every stage its initial state (a new run's weights) at learning rate `lr`."""
        configured = [a.configure.remote(i, lr, states[i]) for i, a in enumerate(self.actors)]
        ray.get(configured, timeout=CONFIGURE_TIMEOUT_S)

    def load(self, checkpoint: Checkpoint) -> None:
        """Every stage takes its shard of `checkpoint` (weights, Adam, lr); the recovery norms and the step the
        weights are at come back with them."""
        configured = [
            a.configure.remote(i, None, shard)
            for i, (a, shard) in enumerate(zip(self.actors, checkpoint.shards))
        ]
        ray.get(configured, timeout=CONFIGURE_TIMEOUT_S)
        if checkpoint.metadata.get("grad_norms"):
            self.grad_norms = [dict(n) for n in checkpoint.metadata["grad_norms"]]
        self.state_step = checkpoint.step

    def replace(self, stage: int, actor) -> None:
        """`actor` takes the place of stage `stage` (the caller configured it, or is about to)."""
        self.actors[stage] = actor

    def node_of(self, stage: int) -> str | None:
        """The node stage `stage`'s actor was last seen on (None: not known)."""
        return self.pool.node_of(self.actors[stage]) if self.pool is not None else None

    def node_event(
        self, kind: str, stage: int, node_id: str | None, at: float | None = None, **detail
    ) -> None:
        """Record a node event of the run (`History.node_events`): `kind` ('stage_lost', 'stage_rebuilt',
        'drain_notice', 'handoff', 'handoff_failed'), the stage, its node, and `at` (monotonic; now when None) as
        seconds since the epoch in `time`, so the events line up with the cluster's own."""
        now = time.monotonic()
        wall = time.time() - (now - at if at is not None else 0.0)
        self.history.node_events.append(
            {"time": wall, "kind": kind, "stage": stage, "node_id": node_id, **detail}
        )

    def kill(self, stage: int) -> None:
        """Kill stage `stage`'s actor for good (one that does not answer is treated as dead)."""
        ray.kill(self.actors[stage], no_restart=True)

    def unanswering(self, timeout_s: float) -> tuple[list[int], list[int]]:
        """(dead stages, stages silent for min(`PING_TIMEOUT_S`, `timeout_s`)); the caller decides about the
        silent ones."""
        return unanswering(self.actors, min(PING_TIMEOUT_S, timeout_s))

    def lost_in_step(self, calls: list[list], refs: list, timed_out: bool) -> StageLost | None:
        """After a failed or timed-out wait on a step's calls (`calls`: each stage's, in submission order; `refs`:
        all of them): which stages are lost and where each was in the step, None when every stage answers.

        On a timeout the stuck stages (`stuck_stages`) are killed first: the survivors' calls waiting on them
        then fail at once and the survivors answer. (Cancelling an ordered actor's queued calls with `ray.cancel`
        instead leaves a gap in its call sequence that stalls it for Ray's 30 s reorder wait.) Stages that still
        do not answer a ping within the bound are killed too.
        """
        detected_at = time.monotonic()
        stuck = stuck_stages(calls) if timed_out else []
        for stage in stuck:
            log.warning(
                "stage %d did not finish its call within %.1fs; killing it", stage, self.step_timeout()
            )
            self.kill(stage)
        self.abandon(refs)
        dead, silent = self.unanswering(self.step_timeout())
        for stage in silent:
            log.warning("stage %d did not answer a ping; killing it", stage)
            self.kill(stage)
        lost = sorted(set(dead) | set(silent) | set(stuck))
        if not lost:
            return None
        phases = {s: phase_of(calls[s]) for s in lost}
        reasons = {s: "timeout" if s in stuck or s in silent else "died" for s in lost}
        return StageLost(lost, phases, detected_at=detected_at, reasons=reasons)

    def answers(self, refs: list, deadline: float, what: str) -> tuple[list, list[int]]:
        """Each stage's answer to its call in `refs` (one per stage, `what` names the call), None for a stage that
        died or did not answer by the monotonic `deadline` (then killed); and the stages that timed out."""
        values: list = []
        silent = []
        for stage, ref in enumerate(refs):
            try:
                values.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except ray.exceptions.GetTimeoutError:
                log.warning("stage %d did not finish its %s in time; killing it", stage, what)
                self.kill(stage)
                silent.append(stage)
                values.append(None)
            except ray.exceptions.RayActorError:
                values.append(None)
        return values, silent

    def shutdown(self) -> None:
        """Read an interrupted attempt's last calls, kill the actors and free the placement group."""
        if self._abandoned:
            ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=1.0)
            self.drain_abandoned()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    # ----- calls of interrupted attempts ------------------------------------------------------------------
    def abandon(self, refs: list) -> None:
        """Calls of an interrupted attempt: read later (`drain_abandoned`) so Ray does not report their errors."""
        self._abandoned += refs

    def drain_abandoned(self) -> None:
        """Read the errors of an interrupted attempt's calls (expected) so Ray does not report them as unhandled;
        calls still running are kept for the next drain."""
        if not self._abandoned:
            return
        ready, pending = ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=0)
        for ref in ready:
            with contextlib.suppress(
                ray.exceptions.RayError, ValueError
            ):  # ValueError: a direct-transport value
                ray.get(ref, timeout=0)
        self._abandoned = pending

    # ----- replicas: what each strategy keeps in step -----------------------------------------------------
    def copy_refs(self, step: int | None = None) -> list | None:
        """CheckFree+: the (de)embedding copies to the swap partners, submitted after the stages' calls so far (the
        one copy path: with each step's submission, and after a recovery). None when nothing is due."""
        if self.strategy != "checkfree+" or (step is not None and step % self.spec.recovery.copy_every != 0):
            return None
        S, a = self.S, self.actors
        return [
            a[1].hold_copy.remote(a[0].get_state.remote((EMBED,))),
            a[S - 2].hold_copy.remote(a[S - 1].get_state.remote((HEAD,))),
        ]

    def sync_replicas(self, pending: list | None = None) -> None:
        """CheckFree+: collect the copies submitted with the step (`pending`), or copy now (after a recovery or at
        start); redundant: back up each successor, tagged `state_step`. Bounded by the step timeout; raises Ray's
        error when a stage is lost meanwhile."""
        copies, backups = self._submit_replicas(pending)
        self._collect_replicas(copies, backups, self.step_timeout(), time.perf_counter())

    def _submit_replicas(self, pending: list | None) -> tuple[list | None, list | None]:
        """The copy refs (`pending`, else submitted now; None when none is due) and the backup refs (redundant)."""
        S, a = self.S, self.actors
        copies = pending if pending is not None else self.copy_refs()
        backups = None
        if self.strategy == "redundant":
            backups = [
                a[i].hold_backup.remote(a[(i + 1) % S].get_state.remote(include_optim=True), self.state_step)
                for i in range(S)
            ]
        return copies, backups

    def _collect_replicas(
        self, copies: list | None, backups: list | None, timeout_s: float, started: float
    ) -> None:
        """Wait (up to `timeout_s`) for the copies and backups and count what they hold."""
        if copies is not None:
            self.history.costs["copy_bytes_held"] = float(sum(ray.get(copies, timeout=timeout_s)))
        if backups is not None:
            held = ray.get(backups, timeout=timeout_s)
            costs = self.history.costs
            costs["redundant_bytes_held"] = float(sum(held))
            costs["redundant_bytes_sent_per_step"] = float(sum(held))
            costs["redundant_sync_s_total"] = (
                costs.get("redundant_sync_s_total", 0.0) + time.perf_counter() - started
            )

    def commit_replicas(self, step: int, loss: float, norms: list[dict | None]) -> None:
        """The copies and backups of `step`, after every stage stepped: part of its commit. A stage lost meanwhile
        (dead, or silent past the bound: then killed) raises `StageLost` in the optimizer phase with the step's
        `norms` and `loss`, so that the step is rolled forward or run again, never half committed."""
        pending, self.pending_copies = self.pending_copies, None
        started = time.perf_counter()
        copies, backups = self._submit_replicas(pending)
        try:
            self._collect_replicas(copies, backups, self.step_timeout(), started)
        except ray.exceptions.RayError as exc:
            detected_at = time.monotonic()
            self.abandon(list(pending or []))
            dead, silent = self.unanswering(self.step_timeout())
            for stage in silent:
                log.warning(
                    "stage %d did not answer a ping while step %d's copies were made; killing it", stage, step
                )
                self.kill(stage)
            lost = sorted(set(dead) | set(silent))
            if not lost:
                if not isinstance(exc, ray.exceptions.GetTimeoutError):
                    raise
                # Late, not lost: each stage answered a ping queued behind its copy and backup calls (a stage runs
                # its calls in order), so those have run by now; a stalled queue (a slow transfer to a node that
                # just joined, Ray's 30 s reorder wait after a lost or moved stage) only delayed them.
                try:
                    self._collect_replicas(copies, backups, FETCH_TIMEOUT_S, started)
                except ray.exceptions.RayError:
                    raise RecoveryError(
                        f"the copies and backups of step {step} did not finish within "
                        f"{self.step_timeout():.1f}s although every stage answers; raise `recovery.step_timeout_s`"
                    ) from None
                log.warning(
                    "step %d: the copies and backups took longer than %.1fs, every stage answering; committed",
                    step,
                    self.step_timeout(),
                )
                return
            log.warning(
                "step %d: stage(s) %s lost after their optimizer step, before their copies and backups landed "
                "(%s); the step is rolled forward or run again",
                step,
                lost,
                type(exc).__name__,
            )
            kept = [None if stage in lost else norm for stage, norm in enumerate(norms)]
            raise StageLost(
                lost,
                "optimizer",
                norms=kept,
                loss=loss,
                detected_at=detected_at,
                reasons=dict.fromkeys(silent, "timeout"),
            ) from None

    def backup_steps(self, stages: list[int]) -> dict[int, int | None] | None:
        """Redundant: the step of the backup of each of `stages`, asked of its holder (its predecessor); None when a
        holder is lost too or does not answer (the recovery then finds it lost)."""
        holders = {stage: (stage - 1) % self.S for stage in stages}
        if any(holder in stages for holder in holders.values()):
            return None
        try:
            tags = ray.get(
                [self.actors[h].backup_step.remote() for h in holders.values()], timeout=self.step_timeout()
            )
        except ray.exceptions.RayError:
            return None
        return dict(zip(holders, tags))
