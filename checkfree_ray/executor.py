"""The coordinator: drives S stage actors through GPipe steps and recovers lost stages.

Per-step protocol (after torchft's quorum/commit): phase 1 runs every micro-batch forward and back
(activations pass as ObjectRefs from actor to actor, never through the driver); phase 2 clips and
steps each stage's Adam. A stage lost in phase 1 is rebuilt and the step is run again (capped by
`recovery.max_step_retries`); a stage lost in phase 2, after the others stepped, is rebuilt from
their new weights and the step counts as committed. A stage's gradient norm is recorded only when
its step commits. Anything the strategy cannot rebuild rolls back to the last checkpoint, or stops
with `RecoveryError` when there is none.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import torch

from checkfree_ray.checkpointing import CheckpointStore
from checkfree_ray.data import ByteCorpus
from checkfree_ray.failures import FailureInjector
from checkfree_ray.model import ModelConfig, build_parts
from checkfree_ray.pool import StagePool
from checkfree_ray.recovery import (
    BLOCKS,
    EMBED,
    HEAD,
    micro_batch_order,
    plain_order,
    plan_recovery,
    recovered_lr,
    reinit_seed,
    reinitialised_blocks,
    route,
    rule_average,
)
from checkfree_ray.stage import initial_stage_state
from schemas.errors import RecoveryError
from schemas.train import FailureRecord, TrainSpec

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 30.0


class StageLost(Exception):
    """Stages found dead during a step; `phase` 1 (forward/backward) or 2 (optimizer step)."""

    def __init__(self, stages: list[int], phase: int, norms: list[dict | None] | None = None, loss: float = 0.0,
                 detected_at: float | None = None):
        self.stages, self.phase, self.norms, self.loss = stages, phase, norms, loss
        self.detected_at = time.monotonic() if detected_at is None else detected_at
        super().__init__(f"stages {stages} lost in phase {phase}")


@dataclass
class History:
    """What the run measured, step by step."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    recovery_phases: list[dict[str, float]] = field(default_factory=list)  # seconds from detection, per recovery
    costs: dict[str, float] = field(default_factory=dict)


class PipelineExecutor:
    """One executor for every strategy: none, checkpoint, redundant, checkfree, checkfree+."""

    def __init__(self, spec: TrainSpec, checkpoint_uri: str | None = None):
        self.spec, self.S = spec, spec.pipeline.num_stages
        self.strategy = spec.recovery.strategy
        self.cfg = ModelConfig.from_spec(spec.model, self.S)
        self.corpus = ByteCorpus(spec.data, spec.model.seq_len, spec.seed)
        self.injector = FailureInjector(spec.failures, self.S)
        every = spec.checkpoint_every()
        uri = checkpoint_uri or spec.checkpointing.uri
        self.checkpoints = CheckpointStore(uri, spec.checkpointing.keep) if every and uri else None
        self.grad_norms: list[dict[str, float]] = [{"blocks": 0.0, "stage": 0.0} for _ in range(self.S)]
        self.history = History()
        self.before_step: list[Callable[[PipelineExecutor, int], None]] = []
        self.after_recovery: list[Callable[[PipelineExecutor, int, list[int]], None]] = []
        self.pool: StagePool | None = None
        self.actors: list = []
        self._pending_copies: list | None = None
        self._abandoned: list = []  # calls of an interrupted attempt
        self.start_time = time.monotonic()

    # ----- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stage actors with the seed's initial weights; write checkpoint 0 when checkpointing."""
        self.pool = StagePool(self.spec, self.cfg)
        self.actors = self.pool.start_stages()
        parts = build_parts(self.cfg, self.spec.seed)
        ray.get([a.configure.remote(i, self.spec.optim.lr, initial_stage_state(parts, i))
                 for i, a in enumerate(self.actors)])
        self._sync_extras(0)
        if self.checkpoints is not None:
            self._save_checkpoint(0)
        self.start_time = time.monotonic()

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        if self._abandoned:  # let an interrupted attempt's last calls fail and read their errors
            ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=1.0)
            self._drain_abandoned()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    # ----- one step ---------------------------------------------------------------------------------------
    def _launch(self, inputs: torch.Tensor, targets: torch.Tensor, train: bool = True):
        """Submit every hop of every micro-batch; returns the loss refs, the backward-done refs and every hop's
        ref (read when a stage dies, so Ray does not log their errors as unhandled)."""
        M = inputs.shape[0]
        loss_refs, done_refs, routes, hop_refs = [], [], [], []
        for mb in range(M):
            order = micro_batch_order(self.strategy, self.S, mb) if train else plain_order(self.S)
            hops = route(order, self.S)
            x, target = inputs[mb].numpy(), targets[mb].numpy()  # small: inlined into the call, no ray.put
            for hop, (stage, parts) in enumerate(hops):
                last = hop == len(hops) - 1
                x = self.actors[stage].forward.remote(mb, hop, parts, x, target if last else None, 1.0 / M, train)
                hop_refs.append(x)
            loss_refs.append(x)
            routes.append(hops)
        if train:  # GPipe: every backward after every forward
            for mb, hops in enumerate(routes):
                grad = None
                for hop in reversed(range(len(hops))):
                    grad = self.actors[hops[hop][0]].backward.remote(mb, hop, grad)
                    hop_refs.append(grad)
                done_refs.append(grad)
        return loss_refs, done_refs, hop_refs

    def _find_lost(self) -> list[int]:
        """Stages whose actor no longer answers."""
        pings = [a.ping.remote() for a in self.actors]
        lost = []
        for stage, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=PING_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                lost.append(stage)
        return lost

    def _drain_abandoned(self) -> None:
        """Read the errors of an interrupted attempt's calls (expected) so Ray does not report them as unhandled;
        calls still running are kept for the next drain."""
        if not self._abandoned:
            return
        ready, pending = ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=0)
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)
        self._abandoned = pending

    def _attempt(self, step: int) -> tuple[float, list[dict]]:
        """Phase 1 and phase 2 of one step; raises `StageLost`.

        The whole step is submitted at once: every hop, then each stage's optimizer step (which takes
        the micro-batches' last backward results as arguments, so Ray runs it only after all of them and
        skips it when any failed: no stage steps unless phase 1 completed everywhere), then the
        CheckFree+ copies. The driver waits once per phase, never per micro-batch.
        """
        self._drain_abandoned()
        pipe = self.spec.pipeline
        inputs, targets = self.corpus.train_batch(step, pipe.micro_batches, pipe.micro_batch_size)
        loss_refs, done_refs, hop_refs = self._launch(inputs, targets)
        step_refs = [a.step.remote(*done_refs) for a in self.actors]
        self._pending_copies = self._submit_copies(step)
        try:
            losses = ray.get(loss_refs)
            ray.get(done_refs)
        except ray.exceptions.RayError:
            lost = self._find_lost()
            if not lost:
                raise
            self._abandoned += [*hop_refs, *step_refs, *(self._pending_copies or [])]
            raise StageLost(lost, phase=1) from None
        loss = sum(losses) / len(losses)
        norms: list[dict | None] = []
        for ref in step_refs:
            try:
                norms.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                norms.append(None)
        lost = [i for i, n in enumerate(norms) if n is None]
        if lost:
            raise StageLost(lost, phase=2, norms=norms, loss=loss)
        return loss, norms

    def run_step(self, step: int) -> int:
        """Run `step` until it commits (retrying after recoveries); returns the next step to run."""
        for hook in self.before_step:
            hook(self, step)
        step_time = sorted(self.history.step_times)[len(self.history.step_times) // 2] if self.history.step_times \
            else None
        for stage in self.injector.draw(step, step_time):
            self.injector.kill(step, stage, self.actors[stage])
        for _attempt in range(self.spec.recovery.max_step_retries + 1):
            started = time.monotonic()
            try:
                loss, norms = self._attempt(step)
            except StageLost as lost:
                rolled_back_to = self._recover_until_stable(step, lost)
                if rolled_back_to is not None:
                    return rolled_back_to + 1
                if lost.phase == 2:
                    self._commit(step, lost.loss, lost.norms, started)
                    return step + 1
                continue
            self._commit(step, loss, norms, started)
            return step + 1
        raise RecoveryError(
            f"step {step} failed {self.spec.recovery.max_step_retries + 1} times in a row; stages keep dying. "
            "Raise `recovery.max_step_retries` or check the cluster's health"
        )

    def _commit(self, step: int, loss: float, norms: list[dict | None], started: float) -> None:
        for stage, norm in enumerate(norms):
            if norm is not None:  # only a stage whose step succeeded records its norm
                self.grad_norms[stage] = norm
        now = time.monotonic()
        h = self.history
        h.steps.append(step)
        h.losses.append(loss)
        h.wall_times.append(now - self.start_time)
        h.step_times.append(now - started)
        try:
            self._sync_extras(step, pending=self._pending_copies)
            if self.checkpoints is not None and step % self.spec.checkpoint_every() == 0:
                self._save_checkpoint(step)
        except ray.exceptions.RayActorError as exc:
            log.warning("a stage died while syncing after step %d (%s); the next step recovers it", step, exc)

    # ----- what each strategy keeps in step -----------------------------------------------------------
    def _submit_copies(self, step: int) -> list | None:
        """CheckFree+: submit the (de)embedding copies (after the stage steps, in each actor's call order)."""
        if self.strategy != "checkfree+" or step % self.spec.recovery.copy_every != 0:
            return None
        S, a = self.S, self.actors
        return [a[1].hold_copy.remote(a[0].get_state.remote((EMBED,))),
                a[S - 2].hold_copy.remote(a[S - 1].get_state.remote((HEAD,)))]

    def _sync_extras(self, step: int, pending: list | None = None) -> None:
        """CheckFree+: copy the embedding and head to their neighbours (or collect the copies submitted with
        the step, `pending`); redundant: back up each successor."""
        S, a = self.S, self.actors
        copied = False
        if pending is not None:
            try:
                self.history.costs["copy_bytes_held"] = float(sum(ray.get(pending)))
                copied = True
            except ray.exceptions.RayError:  # a stage died after stepping; copy again from the rebuilt ones
                pass
        if not copied and self.strategy == "checkfree+" and step % self.spec.recovery.copy_every == 0:
            held = ray.get([a[1].hold_copy.remote(a[0].get_state.remote((EMBED,))),
                            a[S - 2].hold_copy.remote(a[S - 1].get_state.remote((HEAD,)))])
            self.history.costs["copy_bytes_held"] = float(sum(held))
        if self.strategy == "redundant":
            start = time.perf_counter()
            held = ray.get([a[i].hold_backup.remote(a[(i + 1) % S].get_state.remote(include_optim=True))
                            for i in range(S)])
            costs = self.history.costs
            costs["redundant_bytes_held"] = float(sum(held))
            costs["redundant_bytes_sent_per_step"] = float(sum(held))
            costs["redundant_sync_s_total"] = costs.get("redundant_sync_s_total", 0.0) + time.perf_counter() - start

    def _save_checkpoint(self, step: int) -> None:
        shards = ray.get([a.state_bytes.remote() for a in self.actors])
        metadata = {"grad_norms": self.grad_norms, "spec": self.spec.model_dump(mode="json"),
                    "torch": torch.__version__, "ray": ray.__version__}
        _, seconds, nbytes = self.checkpoints.save(step, shards, metadata)
        costs = self.history.costs
        costs["checkpoint_bytes"] = float(nbytes)
        costs["checkpoint_saves"] = costs.get("checkpoint_saves", 0.0) + 1
        costs["checkpoint_save_s_total"] = costs.get("checkpoint_save_s_total", 0.0) + seconds

    # ----- recovery ---------------------------------------------------------------------------------------
    def _recover_until_stable(self, step: int, lost: StageLost) -> int | None:
        """`_recover`, repeated over the union of lost stages while more stages die during the recovery itself.

        A whole node going down is seen one actor at a time: the step fails on the first stage found dead,
        and a neighbour used as a source, or a replacement placed on the node before Ray marked it dead,
        may die while the stage is being rebuilt. Each retry plans again from everything lost so far (two
        adjacent stages then roll back to the checkpoint).
        """
        for _attempt in range(self.spec.recovery.max_step_retries + 1):
            try:
                return self._recover(step, lost)
            except ray.exceptions.RayError as exc:
                more = self._find_lost()
                if not more:
                    raise
                stages = sorted(set(lost.stages) | set(more))
                log.warning("step %d: stage(s) %s died while recovering %s (%s); recovering %s", step, more,
                            lost.stages, type(exc).__name__, stages)
                for stage in lost.stages:  # replacements that may be up but never received their state
                    with contextlib.suppress(Exception):
                        ray.kill(self.actors[stage], no_restart=True)
                lost = StageLost(stages, phase=lost.phase, norms=lost.norms, loss=lost.loss,
                                 detected_at=lost.detected_at)
        raise RecoveryError(
            f"step {step}: stages kept dying while stage(s) {lost.stages} were being recovered; check the "
            "cluster's health or raise `recovery.max_step_retries`"
        )

    def _recover(self, step: int, lost: StageLost) -> int | None:
        """Rebuild the lost stages; returns the checkpoint step when the model was rolled back."""
        stages = lost.stages
        if self.strategy == "none":
            raise RecoveryError(
                f"stage(s) {stages} died at step {step} and `recovery.strategy` is 'none'; choose "
                "'checkfree', 'checkfree+', 'checkpoint' or 'redundant' to survive failures"
            )
        plan = plan_recovery(self.strategy, set(stages), self.S)
        survivors = [i for i in range(self.S) if i not in stages]
        # Drop the failed step's activations and gradients; not waited for: each survivor runs it before
        # any later call (a survivor found dead meanwhile fails the retry, which recovers it).
        self._abandoned += [self.actors[i].reset_step.remote() for i in survivors]
        if plan.rollback:
            return self._rollback(step, lost, plan.reason)
        scope, eps = self.spec.recovery.grad_norm_scope, self.spec.recovery.epsilon
        lr = recovered_lr(self.spec.optim.lr, self.spec.recovery.lr_scale)
        configured, warm = [], []
        for rebuild in plan.rebuilds:
            actor, was_warm = self.pool.take()
            src = [self.actors[s] for s in rebuild.sources]
            if rebuild.method == "checkfree":
                norms = tuple(self.grad_norms[s][scope] for s in rebuild.sources)
                average = rule_average(self.spec.recovery.rule, norms, eps)  # None: random re-initialisation
                blocks = [n.get_state.remote((BLOCKS,)) for n in src] if average is not None else \
                    [reinitialised_blocks(self.cfg, rebuild.stage, reinit_seed(self.spec.seed, step, rebuild.stage))]
                ref = actor.configure.remote(rebuild.stage, lr, *blocks, average=average)
            elif rebuild.method == "copy":  # CheckFree+: the swap partner's blocks + the (de)embedding copy
                ref = actor.configure.remote(rebuild.stage, lr, src[0].get_state.remote((BLOCKS,)),
                                             src[0].get_copy.remote())
            else:  # redundant: the predecessor's exact backup, Adam and lr included
                ref = actor.configure.remote(rebuild.stage, None, src[0].get_backup.remote())
            configured.append(ref)
            warm.append(was_warm)
            self.actors[rebuild.stage] = actor
        taken = time.monotonic()
        ray.get(configured)
        configured_at = time.monotonic()
        self._sync_extras(0)
        self.pool.refill_standby()  # new standbys start in the background, after the rebuild
        self.history.recovery_phases.append({
            "step": step, "take_s": taken - lost.detected_at, "configure_s": configured_at - taken,
            "sync_s": time.monotonic() - configured_at})
        for hook in self.after_recovery:
            hook(self, step, stages)
        for rebuild, was_warm in zip(plan.rebuilds, warm):
            self._record(step, rebuild.stage, rebuild.method, lost, None, was_warm)
        return None

    def _rollback(self, step: int, lost: StageLost, reason: str) -> int:
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        if latest is None:
            raise RecoveryError(
                f"step {step}: {reason}, and there is no checkpoint to fall back to; set `checkpointing.every` "
                "so every strategy has one"
            )
        shards = self.checkpoints.load(latest, self.S)
        warm = False
        for stage in lost.stages:
            self.actors[stage], was_warm = self.pool.take()
            warm = warm or was_warm
        ray.get([a.configure.remote(i, None, shard) for i, (a, shard) in enumerate(zip(self.actors, shards))])
        manifest_norms = self._checkpoint_norms(latest)
        if manifest_norms:
            self.grad_norms = manifest_norms
        self._sync_extras(0)
        self.pool.refill_standby()
        for hook in self.after_recovery:
            hook(self, step, lost.stages)
        for stage in lost.stages:
            self._record(step, stage, "checkpoint", lost, latest, warm)
        log.warning("step %d: %s; rolled back to checkpoint %d", step, reason, latest)
        return latest

    def _checkpoint_norms(self, step: int) -> list[dict] | None:
        from checkfree_ray.checkpointing import checkpoint_dir_name
        from rayops import storage
        from rayops.artifacts import read_manifest

        manifest = read_manifest(storage.join(self.checkpoints.uri, checkpoint_dir_name(step)))
        return manifest["metadata"].get("grad_norms")

    def _record(self, step: int, stage: int, method: str, lost: StageLost, rolled_back_to: int | None,
                warm: bool) -> None:
        done = time.monotonic()
        killed_at = self.injector.kill_times.get((step, stage))
        self.history.failures.append(FailureRecord(
            step=step, stage=stage, strategy=method,
            detection_s=lost.detected_at - killed_at if killed_at is not None else 0.0,
            recovery_s=done - lost.detected_at,
            death_to_retry_s=done - killed_at if killed_at is not None else None,
            rolled_back_to=rolled_back_to, warm_standby=warm, phase=lost.phase,
        ))

    # ----- evaluation and inspection ------------------------------------------------------------------------
    def evaluate(self, step: int) -> float | None:
        """Validation loss over the fixed validation micro-batches (None if a stage died meanwhile)."""
        inputs, targets = self.corpus.val_batches(self.spec.eval_batches, self.spec.pipeline.micro_batch_size)
        loss_refs, _, hop_refs = self._launch(inputs, targets, train=False)
        try:
            value = sum(ray.get(loss_refs)) / len(loss_refs)
        except ray.exceptions.RayActorError:
            self._abandoned += hop_refs
            return None
        self.history.val_steps.append(step)
        self.history.val_losses.append(value)
        return value

    def stage_states(self, parts: tuple[str, ...] = (EMBED, BLOCKS, HEAD)) -> list[dict[str, torch.Tensor]]:
        """Every stage's current model state (for tests and inspection)."""
        return ray.get([a.get_state.remote(parts) for a in self.actors])
