"""The coordinator: drives the run's stage group (`stage_group.py`: S stage actors, their pool and transport)
through GPipe or 1F1B steps (`pipeline_schedules.py`; tensors between stages through the object store or Ray Direct
Transport, `transport.py`); recovery (`stage_recovery.py`, given the group) and asynchronous checkpoint saves
(`saving.py`) live beside it.

Per-step protocol (after torchft's quorum/commit, "a step commits on every stage or is run again"): the
whole step is submitted at once, every forward and backward hop, then each stage's optimizer step (which
waits on the backward results, so no stage steps unless every micro-batch's backward completed), then the
CheckFree+ copies. A stage lost before its optimizer step ('before_step', 'forward', 'backward') is rebuilt
and the step is run again (capped by `recovery.max_step_retries`). Global clipping exchanges the stages' gradient
norms first: a stage lost before its norm is the only one lost (nobody stepped) and the step runs again. A stage
lost in the 'optimizer' phase, after others stepped, or after its own step while its copies and backups were made
(`StageGroup.commit_replicas`: they are part of the commit), is rolled forward: CheckFree rebuilds it from the
same step's neighbours (weights and gradient norms both of that step) and the step commits on every stage; the
redundant strategy rebuilds it from a backup of that step when one landed, else the survivors undo their step and
it runs again. Every wait is bounded by the step timeout; a stage that does not answer in time is killed and
recovered like a dead one (reason 'timeout').
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray
import torch

from checkfree_ray.checkpoint_store import Checkpoint, CheckpointStore
from checkfree_ray.data import make_corpus
from checkfree_ray.draining import DrainHandler
from checkfree_ray.failures import FailureInjector
from checkfree_ray.history import History, restore_history, save_history
from checkfree_ray.hybrid import HybridPolicy, rebuild_strategy
from checkfree_ray.liveness import StageLost
from checkfree_ray.lr_schedule import lr_factor
from checkfree_ray.model_config import ModelConfig
from checkfree_ray.pipeline_schedules import gpipe_order, step_order
from checkfree_ray.recovery_rules import BLOCKS, EMBED, HEAD, micro_batch_order, plain_order, route
from checkfree_ray.run_identity import RunIdentity
from checkfree_ray.saving import CheckpointSaver
from checkfree_ray.stage import initial_states
from checkfree_ray.stage_group import StageGroup
from checkfree_ray.stage_recovery import StageRecovery
from checkfree_ray.timeouts import (
    FIRST_STEP_TIMEOUT_S,
    SAVE_TIMEOUT_S,
    STEP_TIMEOUT_FACTOR,
    STEP_TIMEOUT_FLOOR_S,
)
from checkfree_ray.transport import Transport, connect_or_lose
from schemas.errors import RecoveryError
from schemas.train import TrainSpec

if TYPE_CHECKING:
    from checkfree_ray.pool import StagePool

log = logging.getLogger(__name__)
# Step timeout when `recovery.step_timeout_s` is unset: max(floor, factor x the median step); before any
# step is measured (the first step also pays lazy imports), a generous fixed bound.


class PipelineExecutor:
    """One executor for every strategy: none, checkpoint, redundant, checkfree, checkfree+, hybrid (CheckFree+'s
    rebuilds with checkpoints at the interval of `hybrid.HybridPolicy`)."""

    def __init__(self, spec: TrainSpec, checkpoint_uri: str | None = None, run: RunIdentity | None = None):
        self.spec, self.S = spec, spec.pipeline.num_stages
        self.strategy = rebuild_strategy(spec.recovery.strategy)  # how lost stages are rebuilt
        self.hybrid = HybridPolicy.from_spec(spec) if spec.recovery.strategy == "hybrid" else None
        self.cfg = ModelConfig.from_train_spec(spec)
        self.corpus = make_corpus(spec.data, spec.model.seq_len, spec.seed)
        self.injector = FailureInjector(spec.failures, self.S)
        every = spec.checkpoint_every()
        uri = checkpoint_uri or spec.checkpointing.uri
        self.checkpoints = CheckpointStore(uri, spec.checkpointing.keep, run) if every and uri else None
        self.history = History()
        self.saver = CheckpointSaver(self.checkpoints, self.history) if self.checkpoints is not None else None
        self.resumed_from: list[int] = []  # checkpoint steps this run resumed from (driver restarts)
        self.before_step: list[Callable[[PipelineExecutor, int], None]] = []
        self.after_recovery: list[Callable[[PipelineExecutor, int, list[int]], None]] = []
        self.drain = DrainHandler.for_spec(spec)  # preemption notices: hand-offs between steps (draining.py)
        if self.drain is not None:
            self.before_step.append(self._hand_off_draining)
        self.stages = StageGroup(spec, self.cfg, self.strategy, self.history, self.step_timeout)
        self.recovery = StageRecovery(
            self.stages, self.injector, self.drain, self.checkpoints, self.saver, self._after_recovery
        )
        self.start_time = time.monotonic()

    # ----- the stage group's state, as the run's ------------------------------------------------------------
    @property
    def actors(self) -> list:
        """The stage actors, in stage order."""
        return self.stages.actors

    @property
    def pool(self) -> StagePool | None:
        """The stages' pool (placement group and standbys); None before `start` and after `shutdown`."""
        return self.stages.pool

    @property
    def transport(self) -> Transport:
        """How tensors travel between the stages."""
        return self.stages.transport

    @property
    def grad_norms(self) -> list[dict[str, float]]:
        """Each stage's last committed gradient norms (CheckFree's recovery weights)."""
        return self.stages.grad_norms

    @property
    def state_step(self) -> int:
        """The step the stages' weights are at (it tags the redundant backups)."""
        return self.stages.state_step

    # ----- lifecycle ------------------------------------------------------------------------------------
    def start(self, resume: Checkpoint | None = None) -> None:
        """Start the stage actors with the seed's initial weights (or `resume`'s state: weights, Adam, norms,
        failures fired, history); write checkpoint 0 when checkpointing a new run."""
        self.stages.start()
        if self.drain is not None:
            self.drain.prepare(self.cfg)
        if resume is None:
            states = initial_states(self.spec, self.cfg)  # the seed's weights, or model.hf_path's
            self.stages.configure(self.spec.optim.lr, states)
        else:
            self.stages.load(resume)
            restore_history(self.history, resume.history or {})
            self.injector.fired |= {tuple(item) for item in resume.metadata.get("failures_fired", [])}
            self.resumed_from = [*resume.metadata.get("resumed_from", []), resume.step]
        self.stages.sync_replicas()
        if self.checkpoints is not None and resume is None:
            self._save_checkpoint(0)
        self.start_time = time.monotonic() - (self.history.wall_times[-1] if self.history.wall_times else 0.0)

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        self.stages.shutdown()

    # ----- one step ---------------------------------------------------------------------------------------
    def step_timeout(self) -> float:
        """Seconds a step (or a recovery's wait) may take: the spec's, else max(30 s, 10x the median step)."""
        if self.spec.recovery.step_timeout_s is not None:
            return self.spec.recovery.step_timeout_s
        times = self.history.step_times
        if not times:
            return FIRST_STEP_TIMEOUT_S
        return max(STEP_TIMEOUT_FLOOR_S, STEP_TIMEOUT_FACTOR * sorted(times)[len(times) // 2])

    def _launch(self, inputs: torch.Tensor, targets: torch.Tensor, train: bool = True):
        """Submit every hop of every micro-batch in the order of `pipeline.schedule` (`pipeline_schedules.py`: Ray runs
        each stage's calls in that order); returns the loss refs, the backward-done refs and each stage's calls
        in submission order as (kind, ref, upstream refs) (read when a stage is lost: which phase, which stage is
        stuck, and their errors)."""
        M = inputs.shape[0]
        routes = [
            route(micro_batch_order(self.strategy, self.S, mb) if train else plain_order(self.S), self.S)
            for mb in range(M)
        ]
        order = (
            step_order(self.spec.pipeline.schedule, routes, self.S)
            if train
            else [op for op in gpipe_order(routes) if op[0] == "forward"]
        )  # evaluation: the forwards only
        outputs: dict[tuple[str, int, int], ray.ObjectRef] = {}
        calls: list[list[tuple[str, ray.ObjectRef]]] = [[] for _ in range(self.S)]
        for kind, mb, hop in order:
            stage, parts = routes[mb][hop]
            last = hop == len(routes[mb]) - 1
            if kind == "forward":
                x = (
                    outputs[("forward", mb, hop - 1)] if hop else inputs[mb].numpy()
                )  # small: inlined, no ray.put
                upstream = (x,) if hop else ()
                target = targets[mb].numpy() if last else None
                # the loss goes to the driver: never by direct transport (nor the last backward's None)
                ref = self.transport.submit(
                    self.actors[stage], "forward", not last, mb, hop, parts, x, target, 1.0 / M, train
                )
            else:
                grad = None if last else outputs[("backward", mb, hop + 1)]
                upstream = (grad,) if grad is not None else ()
                ref = self.transport.submit(self.actors[stage], "backward", hop > 0, mb, hop, grad)
            outputs[(kind, mb, hop)] = ref
            calls[stage].append((kind, ref, upstream))
        loss_refs = [outputs[("forward", mb, len(hops) - 1)] for mb, hops in enumerate(routes)]
        done_refs = [outputs[("backward", mb, 0)] for mb in range(M)] if train else []
        return loss_refs, done_refs, calls

    def _submit_optimizer_steps(self, done_refs: list, step: int) -> tuple[list, list]:
        """Each stage's clip and optimizer step, after every backward (global clip: after every stage's squared
        gradient norm, whose refs come second; empty for per-stage clipping)."""
        clip, undo = self.spec.optim.clip, self.strategy == "redundant"
        norm_refs = [a.grad_sq_norm.remote(*done_refs) for a in self.actors] if clip == "global" else []
        upstream = norm_refs or done_refs
        factor = lr_factor(self.spec, step)  # the learning-rate schedule
        return [
            a.step.remote(*upstream, clip=clip, keep_undo=undo, lr_factor=factor) for a in self.actors
        ], norm_refs

    def _attempt(self, step: int) -> tuple[float, list[dict]]:
        """One step, submitted at once; the driver waits once per phase (bounded), never per micro-batch.
        Raises `StageLost`."""
        self.stages.drain_abandoned()
        connect_or_lose(
            self.transport, self.actors, self.step_timeout()
        )  # new group after a recovery, else no-op
        pipe = self.spec.pipeline
        inputs, targets = self.corpus.train_batch(step, pipe.micro_batches, pipe.micro_batch_size)
        loss_refs, done_refs, calls = self._launch(inputs, targets)
        step_refs, norm_refs = self._submit_optimizer_steps(done_refs, step)
        for stage, ref in enumerate(norm_refs):
            calls[stage].append(("optimizer", ref, tuple(done_refs)))
        for stage, ref in enumerate(step_refs):
            calls[stage].append(("optimizer", ref, tuple(norm_refs or done_refs)))
        self.stages.pending_copies = self.stages.copy_refs(step)
        every = [call[1] for stage_calls in calls for call in stage_calls] + list(
            self.stages.pending_copies or []
        )
        deadline = time.monotonic() + self.step_timeout()
        try:
            losses = ray.get(loss_refs, timeout=self.step_timeout())
            ray.get(done_refs, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayError as exc:
            lost = self.stages.lost_in_step(calls, every, isinstance(exc, ray.exceptions.GetTimeoutError))
            if lost is None:
                if isinstance(exc, ray.exceptions.GetTimeoutError):
                    raise RecoveryError(
                        f"step {step} did not finish within {self.step_timeout():.1f}s although every stage "
                        "answers; raise `recovery.step_timeout_s`"
                    ) from None
                raise
            raise lost from None
        loss = sum(losses) / len(losses)
        self._exchange_norms(norm_refs, every, deadline)
        norms, silent = self.stages.answers(step_refs, deadline, "optimizer step")
        if any(norm is not None for norm in norms):
            self.stages.state_step = step  # some stages stepped (a redundant recovery may undo it)
        lost = [i for i, n in enumerate(norms) if n is None]
        if lost:  # the others stepped: the optimizer phase
            self.stages.abandon(list(self.stages.pending_copies or []))
            raise StageLost(
                lost, "optimizer", norms=norms, loss=loss, reasons=dict.fromkeys(silent, "timeout")
            )
        return loss, norms

    def _exchange_norms(self, norm_refs: list, every: list, deadline: float) -> None:
        """Global clip: every stage's squared gradient norm, each computed by its own stage (no stage waits on
        another here, so a missing norm is its own stage's): a stage that died, or did not answer by the deadline
        (then killed), is the only one lost; every step waits on every norm, so nobody stepped and the step runs
        again. Raises `StageLost`; a no-op for per-stage clipping (no refs)."""
        detected_at = time.monotonic()
        values, silent = self.stages.answers(norm_refs, deadline, "gradient norm")
        lost = [stage for stage, value in enumerate(values) if value is None]
        if lost:
            self.stages.abandon(every)
            raise StageLost(
                lost, "optimizer", detected_at=detected_at, reasons=dict.fromkeys(silent, "timeout")
            )

    def run_step(self, step: int) -> int:
        """Run `step` until it commits (retrying after recoveries); returns the next step to run."""
        for hook in self.before_step:
            hook(self, step)
        step_time = (
            sorted(self.history.step_times)[len(self.history.step_times) // 2]
            if self.history.step_times
            else None
        )
        kills = self.injector.draw(step, step_time)
        if kills and self.saver is not None and self.saver.pending is not None:
            self.saver.finish(
                wait_s=SAVE_TIMEOUT_S
            )  # injected kills land after a save in flight (deterministic)
        for stage in kills:
            self.injector.kill(step, stage, self.actors[stage])
        for _attempt in range(self.spec.recovery.max_step_retries + 1):
            started = time.monotonic()
            try:
                loss, norms = self._attempt(step)
                self.stages.commit_replicas(
                    step, loss, norms
                )  # the copies and backups are part of the commit
            except StageLost as lost:
                lost.keeps_step = self.recovery.keeps_step(step, lost)
                if (
                    lost.keeps_step
                ):  # rebuild from the neighbours' weights AND gradient norms of this same step
                    self._keep_norms(lost.norms)
                    self.stages.pending_copies = None  # the recovery copies again from the rebuilt stages
                rolled_back_to = self.recovery.recover_until_stable(step, lost)
                if rolled_back_to is not None:
                    return rolled_back_to + 1
                if lost.keeps_step:
                    self._commit(step, lost.loss, lost.norms, started)
                    return step + 1
                continue
            self._commit(step, loss, norms, started)
            return step + 1
        raise RecoveryError(
            f"step {step} failed {self.spec.recovery.max_step_retries + 1} times in a row; stages keep dying. "
            "Raise `recovery.max_step_retries` or check the cluster's health"
        )

    def _keep_norms(self, norms: list[dict | None] | None) -> None:
        """Record the norms of the stages whose step succeeded (a lost stage keeps its last committed ones)."""
        for stage, norm in enumerate(norms or []):
            if norm is not None:
                self.stages.grad_norms[stage] = norm

    def _commit(self, step: int, loss: float, norms: list[dict | None], started: float) -> None:
        """Record `step`, stepped on every stage with every copy and backup; start its checkpoint save when due."""
        self._keep_norms(norms)
        self.stages.state_step = step
        now = time.monotonic()
        h = self.history
        h.steps.append(step)
        h.losses.append(loss)
        h.wall_times.append(now - self.start_time)
        h.step_times.append(now - started)
        self.stages.pending_copies = None
        try:
            if self.checkpoints is not None:
                self._save_checkpoint(step)
        except (
            ray.exceptions.RayError
        ) as exc:  # the step is committed everywhere: the loss is between two steps
            log.warning(
                "a stage failed while starting the checkpoint save of step %d (%s); it is recovered before "
                "the next step runs (`recover_lost` after the last one)",
                step,
                exc,
            )

    def recover_lost(self, step: int) -> int:
        """Recover the stages lost since the last commit, before step `step` (`StageRecovery.recover_lost`;
        after the last step, which no step follows); returns the next step to run (a rollback's is earlier)."""
        return self.recovery.recover_lost(step)

    def _hand_off_draining(self, _executor: PipelineExecutor, step: int) -> None:
        """The `before_step` hook of preemption notices: hand the stages on draining nodes off (draining.py)."""
        self.drain.before_step(self.stages, self.saver, step)

    def _after_recovery(self, step: int, stages: list[int]) -> None:
        """Run the `after_recovery` hooks once `stages` were recovered at `step`."""
        for hook in self.after_recovery:
            hook(self, step, stages)

    def _save_checkpoint(self, step: int) -> None:
        """After each commit: write the manifest of a save whose shards are all written (`saving.py`); every
        `checkpoint_every()` steps (hybrid: when its policy says) start a new save (the stages write their own
        shards while the next steps run)."""
        self.saver.finish(wait_s=0.0)
        due = (
            self.hybrid.due(step, self.history)
            if self.hybrid is not None
            else step % self.spec.checkpoint_every() == 0
        )
        if not due:
            return
        metadata = {
            "grad_norms": [dict(n) for n in self.grad_norms],
            "spec": self.spec.model_dump(mode="json"),
            "failures_fired": sorted(self.injector.fired),
            "resumed_from": self.resumed_from,
            "torch": torch.__version__,
            "ray": ray.__version__,
        }
        self.saver.start(step, self.actors, metadata, save_history(self.history))

    def finish_checkpoints(self, wait_s: float = SAVE_TIMEOUT_S) -> int | None:
        """Wait (bounded) for the save in flight and write its manifest; returns the newest complete step."""
        if self.saver is None:
            return None
        self.saver.finish(wait_s=wait_s)
        return self.checkpoints.latest()

    # ----- evaluation and inspection ------------------------------------------------------------------------
    def evaluate(self, step: int) -> float | None:
        """Validation loss over the fixed validation micro-batches (None if a stage died meanwhile)."""
        inputs, targets = self.corpus.val_batches(self.spec.eval_batches, self.spec.pipeline.micro_batch_size)
        loss_refs, _, calls = self._launch(inputs, targets, train=False)
        try:
            value = sum(ray.get(loss_refs, timeout=self.step_timeout())) / len(loss_refs)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # the next step recovers it
            self.stages.abandon([call[1] for stage_calls in calls for call in stage_calls])
            return None
        self.history.val_steps.append(step)
        self.history.val_losses.append(value)
        return value

    def stage_states(self, parts: tuple[str, ...] = (EMBED, BLOCKS, HEAD)) -> list[dict[str, torch.Tensor]]:
        """Every stage's current model state (for tests and inspection)."""
        return ray.get([a.get_state.remote(parts) for a in self.actors], timeout=self.step_timeout())
