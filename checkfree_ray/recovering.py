"""Recovery of lost stages, beside the executor that drives the steps.

`recovery.py` decides (pure functions: which stages, which sources, which weights); this module carries the
decision out on Ray: it takes a replacement actor from the pool, hands it its sources and their weights
(the actor only sums), re-syncs what the strategy keeps in step and records each failure. It also tells
where a step was when a stage was lost (`phase_of`), and which stages a timed-out step lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import ray

from checkfree_ray.recovery import (
    BLOCKS,
    at_clip,
    plan_recovery,
    recovered_lr,
    reinit_seed,
    reinitialised_blocks,
    weighing_norm,
)
from checkfree_ray.saving import SAVE_TIMEOUT_S
from schemas.errors import RecoveryError
from schemas.train_result import FailureRecord

if TYPE_CHECKING:
    from checkfree_ray.executor import PipelineExecutor

log = logging.getLogger(__name__)
PING_TIMEOUT_S = 30.0


class StageLost(Exception):
    """Stages found dead (or not answering) during a step.

    `phases` maps each lost stage to where the step was (see `FailureRecord.phase`), `reasons` to 'died' or
    'timeout'; `norms` and `loss` are the step's when the loss came after some stages stepped their optimizer.
    `relost` lists the stages whose replacement was lost during their own recovery (each is one more failure,
    phase 'recovery'). `keeps_step` (set by the executor, `keeps_step`): the survivors keep that step and the lost
    stages are rebuilt at it (rolled forward), instead of the step running again.
    """

    def __init__(
        self,
        stages: list[int],
        phases: dict[int, str] | str = "before_step",
        norms: list[dict | None] | None = None,
        loss: float = 0.0,
        detected_at: float | None = None,
        reasons: dict[int, str] | None = None,
        relost: list[tuple[int, str]] | None = None,
    ):
        self.stages = sorted(stages)
        self.phases = phases if isinstance(phases, dict) else dict.fromkeys(self.stages, phases)
        self.reasons = reasons or {}
        self.relost = (
            relost or []
        )  # (stage, reason) of replacements lost while their stage was being recovered
        self.norms, self.loss = norms, loss
        self.keeps_step = False
        self.detected_at = time.monotonic() if detected_at is None else detected_at
        super().__init__(f"stages {self.stages} lost ({self.phases})")

    @property
    def optimizer_phase(self) -> bool:
        """Whether some stages had stepped their optimizer when the stages were lost."""
        return any(phase == "optimizer" for phase in self.phases.values())


FETCH_TIMEOUT_S = 10.0


def _finished(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        # ready per its owner; fetching a large activation from the object store can still take a moment on a
        # loaded node, so a zero timeout would call a finished call unfinished
        ray.get(ref, timeout=FETCH_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        return True  # ready, its value just slow to fetch: an error would have been there at once
    except ray.exceptions.RayError:
        return False
    except (
        ValueError
    ):  # a Ray Direct Transport value, which the driver may not fetch: it exists, so it finished
        return True
    return True


def phase_of(calls: list[tuple]) -> str:
    """Where a lost stage was in its step: the kind of its first call (in submission order) that did not finish;
    'before_step' when none of them did. `calls` are (kind, ref, upstream refs)."""
    for index, (kind, ref, *_upstream) in enumerate(calls):
        if not _finished(ref):
            return "before_step" if index == 0 else kind
    return "optimizer"


def stuck_stages(calls: list[list[tuple]]) -> list[int]:
    """Stages stuck in a call: their first unfinished call has every input ready, so it is running (a stage
    whose first unfinished call still waits on another stage's output is only waiting)."""
    stuck = []
    for stage, stage_calls in enumerate(calls):
        for _kind, ref, upstream in stage_calls:
            if ray.wait([ref], timeout=0)[0]:
                continue
            inputs = list(upstream)
            if not inputs or len(ray.wait(inputs, num_returns=len(inputs), timeout=0)[0]) == len(inputs):
                stuck.append(stage)
            break
    return stuck


def unanswering(actors: list, timeout_s: float) -> tuple[list[int], list[int]]:
    """(stages whose actor is dead, stages whose actor did not answer a ping within `timeout_s`)."""
    pings = [a.ping.remote() for a in actors]
    deadline = time.monotonic() + timeout_s
    dead, silent = [], []
    for stage, ref in enumerate(pings):
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            silent.append(stage)
        except ray.exceptions.RayActorError:
            dead.append(stage)
    return dead, silent


def keeps_step(ex: PipelineExecutor, step: int, lost: StageLost) -> bool:
    """Whether the survivors keep their optimizer step of `step` and the lost stages are rebuilt at it: for
    CheckFree and CheckFree+ whenever the survivors stepped (the neighbours' weights and norms of that step); for the
    redundant strategy only when every lost stage's backup is of that step (it landed before the stage was lost);
    else the survivors undo their step (`recover`) and the step runs again."""
    if lost.norms is None:
        return False
    if ex.strategy in ("checkfree", "checkfree+"):
        return True
    if ex.strategy != "redundant":
        return False
    tags = backup_steps(ex, lost.stages)
    return tags is not None and all(tag == step for tag in tags.values())


def backup_steps(ex: PipelineExecutor, stages: list[int]) -> dict[int, int | None] | None:
    """Redundant: the step of the backup of each of `stages`, asked of its holder (its predecessor); None when a
    holder is lost too or does not answer (the recovery then finds it lost)."""
    holders = {stage: (stage - 1) % ex.S for stage in stages}
    if any(holder in stages for holder in holders.values()):
        return None
    try:
        tags = ray.get(
            [ex.actors[h].backup_step.remote() for h in holders.values()], timeout=ex.step_timeout()
        )
    except ray.exceptions.RayError:
        return None
    return dict(zip(holders, tags))


def recover_lost(ex: PipelineExecutor, step: int) -> int:
    """Between two steps (and after the last one, which no step follows): recover the stages lost since the last
    commit as step `step` would, recorded at `step` in phase 'before_step'. Returns the next step to run: `step`, or
    the one after the checkpoint a rollback restored."""
    detected_at = time.monotonic()
    dead, silent = unanswering(ex.actors, min(PING_TIMEOUT_S, ex.step_timeout()))
    for stage in silent:
        log.warning("stage %d did not answer a ping between steps; killing it", stage)
        ray.kill(ex.actors[stage], no_restart=True)
    lost = sorted(set(dead) | set(silent))
    if not lost:
        return step
    log.warning("stage(s) %s lost after step %d committed; recovering them before going on", lost, step - 1)
    reasons = dict.fromkeys(silent, "timeout")
    rolled_back_to = recover_until_stable(ex, step, StageLost(lost, detected_at=detected_at, reasons=reasons))
    return step if rolled_back_to is None else rolled_back_to + 1


def recover_until_stable(ex: PipelineExecutor, step: int, lost: StageLost) -> int | None:
    """`recover`, repeated over the union of lost stages while more stages die during the recovery itself.

    A whole node going down is seen one actor at a time: the step fails on the first stage found dead,
    and a neighbour used as a source, or a replacement placed on the node before Ray marked it dead,
    may die while the stage is being rebuilt. Each retry plans again from everything lost so far (two
    adjacent stages then roll back to the checkpoint); stages lost this way are recorded in phase 'recovery'.
    """
    for _attempt in range(ex.spec.recovery.max_step_retries + 1):
        try:
            return recover(ex, step, lost)
        except ray.exceptions.RayError as exc:
            dead, silent = unanswering(ex.actors, min(PING_TIMEOUT_S, ex.step_timeout()))
            for stage in silent:
                ray.kill(ex.actors[stage], no_restart=True)
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
                    ray.kill(ex.actors[stage], no_restart=True)
            phases = {s: lost.phases.get(s, "recovery") for s in stages}
            reasons = {**lost.reasons, **{s: "timeout" for s in silent if s not in lost.stages}}
            relost = [(s, "timeout" if s in silent else "died") for s in more if s in lost.stages]
            keeps = lost.keeps_step
            lost = StageLost(
                stages,
                phases,
                norms=lost.norms,
                loss=lost.loss,
                detected_at=lost.detected_at,
                reasons=reasons,
                relost=[*lost.relost, *relost],
            )
            lost.keeps_step = keeps  # the executor commits the step after the recovery when it kept it
    raise RecoveryError(
        f"step {step}: stages kept dying while stage(s) {lost.stages} were being recovered; check the "
        "cluster's health or raise `recovery.max_step_retries`"
    )


def recover(ex: PipelineExecutor, step: int, lost: StageLost) -> int | None:
    """Rebuild the lost stages from the plan's recipe; returns the checkpoint step when the model was rolled back."""
    spec, stages = ex.spec, lost.stages
    if ex.strategy == "none":
        raise RecoveryError(
            f"stage(s) {stages} died at step {step} and `recovery.strategy` is 'none'; choose "
            "'checkfree', 'checkfree+', 'checkpoint' or 'redundant' to survive failures"
        )
    rec = spec.recovery
    norms = [weighing_norm(n, rec.grad_norm_scope, rec.grad_norm) for n in ex.grad_norms]
    plan = plan_recovery(ex.strategy, set(stages), ex.S, rec.rule, norms, rec.epsilon)
    survivors = [i for i in range(ex.S) if i not in stages]
    # Drop the failed step's activations and gradients; not waited for: each survivor runs it before
    # any later call (a survivor found dead meanwhile fails the retry, which recovers it).
    ex.abandon([ex.actors[i].reset_step.remote() for i in survivors])
    if plan.rollback:
        return rollback(ex, step, lost, plan.reason)
    if ex.strategy == "redundant" and lost.norms is not None and not lost.keeps_step:
        # The backups are from before this step: the survivors undo their step, so that no stage holds a
        # step the others do not (a step commits on every stage or is run again).
        ray.get([ex.actors[i].revert_step.remote() for i in survivors], timeout=ex.step_timeout())
        ex.state_step = step - 1
    if ex.strategy == "redundant":
        tags = backup_steps(ex, stages)
        stale = {stage: tag for stage, tag in (tags or {}).items() if tag != ex.state_step}
        if stale:  # never a stage rebuilt at another step than the others (no checkpoint: a clear error)
            return rollback(
                ex,
                step,
                lost,
                f"the backup of stage(s) {sorted(stale)} is of step(s) "
                f"{sorted(set(stale.values()), key=str)}, the other stages are at step {ex.state_step}",
            )
    lr = recovered_lr(spec.optim.lr, rec.lr_scale)
    avoid = ex.drain.avoid_nodes() if ex.drain is not None else frozenset()  # never onto a draining node
    takes = [ex.pool.take(avoid_nodes=avoid) for _ in plan.rebuilds]
    pings = [actor.ping.remote() for actor, _ in takes]  # ahead of `configure`, which waits for its sources
    if (
        ex.transport.direct
    ):  # device to device: the replacements join the group before their sources send to them
        wait_scheduled(ex, pings, [r.stage for r in plan.rebuilds])
        members = list(ex.actors)
        for rebuild, (actor, _) in zip(plan.rebuilds, takes):
            members[rebuild.stage] = actor
        ex.transport.connect(members)
    configured, warm = [], []
    for rebuild, (actor, was_warm) in zip(plan.rebuilds, takes):
        src = [ex.actors[s] for s in rebuild.sources]
        if rebuild.method == "checkfree" and not rebuild.sources:  # the "random" and "identity" rules
            blocks = reinitialised_blocks(
                ex.cfg, rebuild.stage, reinit_seed(spec.seed, step, rebuild.stage), rebuild.rule
            )
            ref = actor.configure.remote(rebuild.stage, lr, blocks)
        elif rebuild.method == "checkfree":  # the recipe's neighbours and weights; the actor only sums
            _count_clip(ex, rebuild.stage)
            ref = actor.configure.remote(
                rebuild.stage, lr, *[_blocks_of(ex, n) for n in src], weights=rebuild.weights
            )
        elif rebuild.method == "copy":  # CheckFree+: the swap partner's blocks + the (de)embedding copy
            ref = actor.configure.remote(rebuild.stage, lr, _blocks_of(ex, src[0]), src[0].get_copy.remote())
        else:  # redundant: the predecessor's exact backup, Adam and lr included
            ref = actor.configure.remote(rebuild.stage, None, src[0].get_backup.remote())
        configured.append(ref)
        warm.append(was_warm)
        ex.actors[rebuild.stage] = actor
    taken = time.monotonic()
    wait_scheduled(ex, pings, [r.stage for r in plan.rebuilds])
    ray.get(configured, timeout=ex.step_timeout())
    configured_at = time.monotonic()
    ex._sync_extras()
    ex.pool.refill_standby()  # new standbys start in the background, after the rebuild
    ex.history.recovery_phases.append(
        {
            "step": step,
            "take_s": taken - lost.detected_at,
            "configure_s": configured_at - taken,
            "sync_s": time.monotonic() - configured_at,
        }
    )
    for hook in ex.after_recovery:
        hook(ex, step, stages)
    for rebuild, was_warm in zip(plan.rebuilds, warm):
        record_failure(ex, step, rebuild.stage, rebuild.method, lost, None, was_warm)
    methods = {rebuild.stage: rebuild.method for rebuild in plan.rebuilds}
    for stage, reason in lost.relost:
        record_failure(ex, step, stage, methods[stage], lost, None, False, relost_reason=reason)
    return None


def rollback(ex: PipelineExecutor, step: int, lost: StageLost, reason: str) -> int:
    """Restore every stage from this run's newest complete checkpoint (an earlier one when it is corrupt)."""
    if ex.checkpoints is None:
        raise RecoveryError(
            f"step {step}: {reason}, and there is no checkpoint to fall back to; set `checkpointing.every` "
            "so every strategy has one"
        )
    ex.saver.finish(wait_s=SAVE_TIMEOUT_S)  # a save whose shards were all written before the loss counts
    checkpoint = ex.checkpoints.load_latest(ex.S, context=f"step {step}: {reason}")
    warm = False
    for stage in lost.stages:
        ray.kill(
            ex.actors[stage], no_restart=True
        )  # one still alive would keep its bundle from its replacement
        ex.actors[stage], was_warm = ex.pool.take()
        warm = warm or was_warm
    ex._load_checkpoint(checkpoint)
    ex.state_step = checkpoint.step
    h = ex.history
    h.rolled_back += [False] * (len(h.steps) - len(h.rolled_back))
    h.rolled_back = [gone or s > checkpoint.step for s, gone in zip(h.steps, h.rolled_back)]
    ex._sync_extras()
    ex.pool.refill_standby()
    for hook in ex.after_recovery:
        hook(ex, step, lost.stages)
    for stage in lost.stages:
        record_failure(ex, step, stage, "checkpoint", lost, checkpoint.step, warm)
    for stage, why in lost.relost:
        record_failure(ex, step, stage, "checkpoint", lost, checkpoint.step, False, relost_reason=why)
    log.warning("step %d: %s; rolled back to checkpoint %d", step, reason, checkpoint.step)
    return checkpoint.step


def record_failure(
    ex: PipelineExecutor,
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
    killed_at = ex.injector.kill_times.get((step, stage)) if relost_reason is None else None
    ex.history.failures.append(
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
            else ex._phase_of_lost(stage, lost.phases.get(stage, "recovery")),
            reason=relost_reason or _reason(ex, stage, lost.reasons.get(stage, "died")),
        )
    )


def _reason(ex: PipelineExecutor, stage: int, reason: str) -> str:
    """`reason`, or why a stage that died had not been handed off although its node had a notice (draining.py)."""
    noticed = ex.drain.reason_for_loss(stage) if ex.drain is not None and reason == "died" else None
    return noticed or reason


def _blocks_of(ex: PipelineExecutor, source) -> ray.ObjectRef:
    """A source stage's blocks for a rebuild: device to device by the run's direct transport when it has one
    (`transport.py`), else through the object store."""
    return ex.transport.submit(source, "get_state", True, (BLOCKS,))


def _count_clip(ex: PipelineExecutor, stage: int) -> None:
    """Count CheckFree rebuilds, and those whose two neighbours both sat at the clip (then the weighted rule
    equals the plain average)."""
    costs = ex.history.costs
    costs["checkfree_rebuilds"] = costs.get("checkfree_rebuilds", 0.0) + 1
    both = all(at_clip(ex.grad_norms[s], ex.spec.optim.grad_clip) for s in (stage - 1, stage + 1))
    costs["rebuilds_both_neighbours_at_clip"] = costs.get("rebuilds_both_neighbours_at_clip", 0.0) + both


def wait_scheduled(ex: PipelineExecutor, pings: list, stages: list[int]) -> None:
    """Wait (bounded) until the replacements answer their first ping; a clear error naming the missing resources
    if they were not scheduled in time."""
    from checkfree_ray import pool

    timeout = pool.READY_TIMEOUT_S
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout)
    if len(ready) == len(pings):
        return
    pipe = ex.spec.pipeline
    free = ray.available_resources().get("CPU", 0.0)
    raise RecoveryError(
        f"the replacement for stage(s) {stages} was not scheduled within {timeout:.0f}s: it needs "
        f"{pipe.num_cpus_per_stage} CPU (`pipeline.num_cpus_per_stage`) in a bundle of the run's placement group, "
        f"and the cluster has {free:g} CPU free; add nodes, turn on `pipeline.warm_standby` or lower "
        "`pipeline.num_cpus_per_stage`"
    )
