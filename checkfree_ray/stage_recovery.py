"""Recovery of lost stages: carries out on the stage group what the recovery rules decide.

`recovery_rules.py` decides (pure functions: which stages, which sources, which weights); `StageRecovery` carries the
decision out on Ray through the run's `StageGroup`: it takes a replacement actor from the pool, hands it its
sources and their weights (the actor only sums), re-syncs what the strategy keeps in step and records each
failure. Which stages are lost, and where the step was for each, comes from `liveness.py`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ray

from checkfree_ray.liveness import StageLost
from checkfree_ray.pool import NodeWaitTimeout, stage_bundle
from checkfree_ray.recovery_rules import BLOCKS, at_clip, plan_for, rebuild_sources, recovered_lr
from checkfree_ray.stage_group import StageGroup
from checkfree_ray.timeouts import SAVE_TIMEOUT_S
from schemas.errors import RecoveryError
from schemas.train_result import FailureRecord

if TYPE_CHECKING:
    from checkfree_ray.checkpoint_store import CheckpointStore
    from checkfree_ray.draining import DrainHandler
    from checkfree_ray.failures import FailureInjector
    from checkfree_ray.saving import CheckpointSaver

log = logging.getLogger(__name__)


class StageRecovery:
    """Rebuilds the lost stages of one run's `group` (by its strategy, or by rolling back to a checkpoint) and
    records each failure in the group's history; `on_recovered(step, stages)` runs after each recovery."""

    def __init__(
        self,
        group: StageGroup,
        injector: FailureInjector,
        drain: DrainHandler | None,
        checkpoints: CheckpointStore | None,
        saver: CheckpointSaver | None,
        on_recovered: Callable[[int, list[int]], None],
    ):
        self.group, self.injector, self.drain = group, injector, drain
        self.checkpoints, self.saver, self.on_recovered = checkpoints, saver, on_recovered

    def keeps_step(self, step: int, lost: StageLost) -> bool:
        """Whether the survivors keep their optimizer step of `step` and the lost stages are rebuilt at it: for
        CheckFree and CheckFree+ whenever the survivors stepped (the neighbours' weights and norms of that step);
        for the redundant strategy only when every lost stage's backup is of that step (it landed before the stage
        was lost); else the survivors undo their step (`recover`) and the step runs again."""
        if lost.norms is None:
            return False
        if self.group.strategy in ("checkfree", "checkfree+"):
            return True
        if self.group.strategy != "redundant":
            return False
        tags = self.group.backup_steps(lost.stages)
        return tags is not None and all(tag == step for tag in tags.values())

    def recover_lost(self, step: int) -> int:
        """Between two steps (and after the last one, which no step follows): recover the stages lost since the
        last commit as step `step` would, recorded at `step` in phase 'before_step'. Returns the next step to run:
        `step`, or the one after the checkpoint a rollback restored."""
        group = self.group
        detected_at = time.monotonic()
        dead, silent = group.unanswering(group.step_timeout())
        for stage in silent:
            log.warning("stage %d did not answer a ping between steps; killing it", stage)
            group.kill(stage)
        lost = sorted(set(dead) | set(silent))
        if not lost:
            return step
        log.warning(
            "stage(s) %s lost after step %d committed; recovering them before going on", lost, step - 1
        )
        reasons = dict.fromkeys(silent, "timeout")
        rolled_back_to = self.recover_until_stable(
            step, StageLost(lost, detected_at=detected_at, reasons=reasons)
        )
        return step if rolled_back_to is None else rolled_back_to + 1

    def recover_until_stable(self, step: int, lost: StageLost) -> int | None:
        """`recover`, repeated over the union of lost stages while more stages die during the recovery itself.

        A whole node going down is seen one actor at a time: the step fails on the first stage found dead,
        and a neighbour used as a source, or a replacement placed on the node before Ray marked it dead,
        may die while the stage is being rebuilt. Each retry plans again from everything lost so far (two
        adjacent stages then roll back to the checkpoint); stages lost this way are recorded in phase 'recovery'.
        """
        group = self.group
        for _attempt in range(group.spec.recovery.max_step_retries + 1):
            try:
                return self.recover(step, lost)
            except ray.exceptions.RayError as exc:
                dead, silent = group.unanswering(group.step_timeout())
                for stage in silent:
                    group.kill(stage)
                more = sorted(set(dead) | set(silent))
                if not more:
                    raise
                stages = sorted(set(lost.stages) | set(more))
                log.warning(
                    "step %d: stage(s) %s died while recovering %s (%s); recovering %s",
                    step,
                    more,
                    lost.stages,
                    type(exc).__name__,
                    stages,
                )
                for stage in lost.stages:  # replacements that may be up but never received their state
                    with contextlib.suppress(Exception):
                        group.kill(stage)
                lost = _widened(lost, stages, more, silent)
        raise RecoveryError(
            f"step {step}: stages kept dying while stage(s) {lost.stages} were being recovered; check the "
            "cluster's health or raise `recovery.max_step_retries`"
        )

    def recover(self, step: int, lost: StageLost) -> int | None:
        """Rebuild the lost stages from the plan's recipe; returns the checkpoint step when the model was rolled
        back."""
        group, stages = self.group, lost.stages
        spec, strategy = group.spec, group.strategy
        if strategy == "none":
            raise RecoveryError(
                f"stage(s) {stages} died at step {step} and `recovery.strategy` is 'none'; choose "
                "'checkfree', 'checkfree+', 'checkpoint' or 'redundant' to survive failures"
            )
        plan = plan_for(spec.recovery, strategy, stages, group.S, group.grad_norms)
        survivors = [i for i in range(group.S) if i not in stages]
        # Drop the failed step's activations and gradients; not waited for: each survivor runs it before
        # any later call (a survivor found dead meanwhile fails the retry, which recovers it).
        group.abandon([group.actors[i].reset_step.remote() for i in survivors])
        if plan.rollback:
            return self.rollback(step, lost, plan.reason)
        if strategy == "redundant" and lost.norms is not None and not lost.keeps_step:
            # The backups are from before this step: the survivors undo their step, so that no stage holds a
            # step the others do not (a step commits on every stage or is run again).
            ray.get([group.actors[i].revert_step.remote() for i in survivors], timeout=group.step_timeout())
            group.state_step = step - 1
        if strategy == "redundant":
            tags = group.backup_steps(stages)
            stale = {stage: tag for stage, tag in (tags or {}).items() if tag != group.state_step}
            if stale:  # never a stage rebuilt at another step than the others (no checkpoint: a clear error)
                return self.rollback(
                    step,
                    lost,
                    f"the backup of stage(s) {sorted(stale)} is of step(s) "
                    f"{sorted(set(stale.values()), key=str)}, the other stages are at step {group.state_step}",
                )
        self._rebuild(step, lost, plan)
        return None

    def _rebuild(self, step: int, lost: StageLost, plan) -> None:
        """Carry out `plan`'s rebuilds: replacements from the pool, configured from their sources."""
        group, spec = self.group, self.group.spec
        self._record_lost(step, lost)
        lr = recovered_lr(spec.optim.lr, spec.recovery.lr_scale)
        avoid = (
            self.drain.avoid_nodes() if self.drain is not None else frozenset()
        )  # never onto a draining node
        takes = [group.pool.take(avoid_nodes=avoid) for _ in plan.rebuilds]
        pings = [
            actor.ping.remote() for actor, _ in takes
        ]  # ahead of `configure`, which waits for its sources
        if (
            group.transport.direct
        ):  # device to device: the replacements join the group before their sources send
            self.wait_scheduled(pings, [r.stage for r in plan.rebuilds], [actor for actor, _ in takes])
            members = list(group.actors)
            for rebuild, (actor, _) in zip(plan.rebuilds, takes):
                members[rebuild.stage] = actor
            group.transport.connect(members)
        configured, warm = [], []
        for rebuild, (actor, was_warm) in zip(plan.rebuilds, takes):
            configured.append(self._configure(step, rebuild, actor, lr))
            warm.append(was_warm)
            group.replace(rebuild.stage, actor)
        taken = time.monotonic()
        self.wait_scheduled(pings, [r.stage for r in plan.rebuilds], [actor for actor, _ in takes])
        ray.get(configured, timeout=group.step_timeout())
        configured_at = time.monotonic()
        group.sync_replicas()
        group.pool.refill_standby()  # new standbys start in the background, after the rebuild
        group.history.recovery_phases.append(
            {
                "step": step,
                "take_s": taken - lost.detected_at,
                "configure_s": configured_at - taken,
                "sync_s": time.monotonic() - configured_at,
            }
        )
        self.on_recovered(step, lost.stages)
        for rebuild, was_warm in zip(plan.rebuilds, warm):
            self.record_failure(step, rebuild.stage, rebuild.method, lost, None, was_warm)
            self._record_rebuilt(step, rebuild.stage, rebuild.method, lost, was_warm)
        methods = {rebuild.stage: rebuild.method for rebuild in plan.rebuilds}
        for stage, reason in lost.relost:
            self.record_failure(step, stage, methods[stage], lost, None, False, relost_reason=reason)

    def _configure(self, step: int, rebuild, actor, lr: float) -> ray.ObjectRef:
        """Submit the state of one rebuilt stage to its replacement `actor` (sources are the current stages)."""
        group = self.group
        if rebuild.method == "checkfree" and rebuild.sources:
            self._count_clip(rebuild.stage)
        actors = group.actors
        src = rebuild_sources(
            rebuild,
            lr,
            group.cfg,
            group.spec.seed,
            step,
            blocks_of=lambda s: self._blocks_of(actors[s]),
            copy_of=lambda s: actors[s].get_copy.remote(),
            backup_of=lambda s: actors[s].get_backup.remote(),
        )
        return actor.configure.remote(rebuild.stage, src.lr, *src.sources, weights=src.weights)

    def rollback(self, step: int, lost: StageLost, reason: str) -> int:
        """Restore every stage from this run's newest complete checkpoint (an earlier one when it is corrupt)."""
        group = self.group
        if self.checkpoints is None:
            raise RecoveryError(
                f"step {step}: {reason}, and there is no checkpoint to fall back to; set `checkpointing.every` "
                "so every strategy has one"
            )
        self.saver.finish(
            wait_s=SAVE_TIMEOUT_S
        )  # a save whose shards were all written before the loss counts
        checkpoint = self.checkpoints.load_latest(group.S, context=f"step {step}: {reason}")
        self._record_lost(step, lost)
        warm = False
        pings = []
        for stage in lost.stages:
            group.kill(stage)  # one still alive would keep its bundle from its replacement
            actor, was_warm = group.pool.take()
            group.replace(stage, actor)
            pings.append(actor.ping.remote())
            warm = warm or was_warm
        self.wait_scheduled(pings, lost.stages, [group.actors[stage] for stage in lost.stages])
        group.load(checkpoint)
        h = group.history
        h.rolled_back += [False] * (len(h.steps) - len(h.rolled_back))
        h.rolled_back = [gone or s > checkpoint.step for s, gone in zip(h.steps, h.rolled_back)]
        group.sync_replicas()
        group.pool.refill_standby()
        self.on_recovered(step, lost.stages)
        for stage in lost.stages:
            self.record_failure(step, stage, "checkpoint", lost, checkpoint.step, warm)
            self._record_rebuilt(step, stage, "checkpoint", lost, warm)
        for stage, why in lost.relost:
            self.record_failure(step, stage, "checkpoint", lost, checkpoint.step, False, relost_reason=why)
        log.warning("step %d: %s; rolled back to checkpoint %d", step, reason, checkpoint.step)
        return checkpoint.step

    def record_failure(
        self,
        step: int,
        stage: int,
        method: str,
        lost: StageLost,
        rolled_back_to: int | None,
        warm: bool,
        relost_reason: str | None = None,
    ) -> None:
        """Append the failure of `stage` at `step` to the history, with its phase, reason and timings; with
        `relost_reason`, the loss of its replacement during the recovery (phase 'recovery')."""
        done = time.monotonic()
        killed_at = self.injector.kill_times.get((step, stage)) if relost_reason is None else None
        self.group.history.failures.append(
            FailureRecord(
                step=step,
                stage=stage,
                method=method,
                detection_s=lost.detected_at - killed_at if killed_at is not None else 0.0,
                recovery_s=done - lost.detected_at,
                death_to_retry_s=done - killed_at if killed_at is not None else None,
                rolled_back_to=rolled_back_to,
                warm_standby=warm,
                phase="recovery"
                if relost_reason
                else self.phase_of_lost(stage, lost.phases.get(stage, "recovery")),
                reason=relost_reason or self._reason(stage, lost.reasons.get(stage, "died")),
            )
        )

    def phase_of_lost(self, stage: int, phase: str) -> str:
        """`phase`, or 'checkpoint_save' for a stage lost between steps before its shard of the save in flight
        was written."""
        return self.saver.phase_of_lost(stage, phase) if self.saver is not None else phase

    def _reason(self, stage: int, reason: str) -> str:
        """`reason`, or why a stage that died had not been handed off although its node had a notice
        (draining.py)."""
        noticed = self.drain.reason_for_loss(stage) if self.drain is not None and reason == "died" else None
        return noticed or reason

    def _blocks_of(self, source) -> ray.ObjectRef:
        """A source stage's blocks for a rebuild: device to device by the run's direct transport when it has one
        (`transport.py`), else through the object store."""
        return self.group.transport.submit(source, "get_state", True, (BLOCKS,))

    def _count_clip(self, stage: int) -> None:
        """Count CheckFree rebuilds, and those whose two neighbours both sat at the clip (then the weighted rule
        equals the plain average)."""
        group = self.group
        costs = group.history.costs
        costs["checkfree_rebuilds"] = costs.get("checkfree_rebuilds", 0.0) + 1
        both = all(at_clip(group.grad_norms[s], group.spec.optim.grad_clip) for s in (stage - 1, stage + 1))
        costs["rebuilds_both_neighbours_at_clip"] = costs.get("rebuilds_both_neighbours_at_clip", 0.0) + both

    def _record_lost(self, step: int, lost: StageLost) -> None:
        """A node event per lost stage, on the node its actor was last seen on (before it is replaced)."""
        for stage in lost.stages:
            self.group.node_event(
                "stage_lost",
                stage,
                self.group.node_of(stage),
                at=lost.detected_at,
                step=step,
                reason=lost.reasons.get(stage, "died"),
            )

    def _record_rebuilt(self, step: int, stage: int, method: str, lost: StageLost, warm: bool) -> None:
        """A node event for a rebuilt stage: where it runs now and how long the pipeline was not whole."""
        self.group.node_event(
            "stage_rebuilt",
            stage,
            self.group.node_of(stage),
            step=step,
            method=method,
            warm_standby=warm,
            whole_after_s=time.monotonic() - lost.detected_at,
        )

    def wait_scheduled(self, pings: list, stages: list[int], actors: list) -> None:
        """Wait until the replacements answer their first ping (and note their nodes), at most
        `recovery.node_wait_s`: a node for each may have to come first (room on a live node, or one an autoscaler
        launches for its pending bundle). Past it `NodeWaitTimeout` names the field and what was missing; the
        run stops there and a rerun resumes it."""
        group = self.group
        timeout = group.pool.node_wait_s
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout)
        for ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):  # a dead one fails the configure that follows
                group.pool.note_node(actors[pings.index(ref)], ray.get(ref, timeout=0))
        if len(ready) == len(pings):
            return
        pipe = group.spec.pipeline
        free = ray.available_resources().get("CPU", 0.0)
        wanted = f"{stage_bundle(group.spec)}" + (
            f" on a node labelled {pipe.node_labels}" if pipe.node_labels else ""
        )
        raise NodeWaitTimeout(
            f"the replacement for stage(s) {stages} got no node within {timeout:.0f}s (`recovery.node_wait_s`): it "
            f"needs {wanted} (`pipeline.num_cpus_per_stage`, `pipeline.node_resources`, `pipeline.node_labels`) and "
            f"the cluster has {free:g} CPU free; the run stopped there: run the same spec again to resume it from "
            "its newest checkpoint once nodes are back (or raise `recovery.node_wait_s`, add nodes, turn on "
            "`pipeline.warm_standby`)"
        )


def _widened(lost: StageLost, stages: list[int], more: list[int], silent: list[int]) -> StageLost:
    """`lost` grown to `stages` after `more` died (or were `silent`) during its recovery: each newly lost stage in
    phase 'recovery', each replacement lost in `relost`; whether the step is kept carries over."""
    phases = {s: lost.phases.get(s, "recovery") for s in stages}
    reasons = {**lost.reasons, **{s: "timeout" for s in silent if s not in lost.stages}}
    relost = [(s, "timeout" if s in silent else "died") for s in more if s in lost.stages]
    widened = StageLost(
        stages,
        phases,
        norms=lost.norms,
        loss=lost.loss,
        detected_at=lost.detected_at,
        reasons=reasons,
        relost=[*lost.relost, *relost],
    )
    widened.keeps_step = lost.keeps_step  # the executor commits the step after the recovery when it kept it
    return widened
