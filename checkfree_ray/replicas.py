"""What each strategy keeps in step beside the stages' own state, as part of every commit: CheckFree+'s
(de)embedding copies on the swap partners, and the redundant strategy's backups (stage i holds stage i+1's whole
state, weights, Adam and lr, tagged with the step that state is at).

A step commits on every stage with every copy and backup, or is not committed (torchft's "should_commit"): a stage
lost while they are made (`sync_commit`) is a loss in the step's optimizer phase, every stage having stepped, so
the executor rolls the step forward (a rebuild of that same step) or runs it again; the step is never recorded
while a backup of it is missing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import ray

from checkfree_ray.recovering import PING_TIMEOUT_S, StageLost, unanswering
from checkfree_ray.recovery import EMBED, HEAD
from schemas.errors import RecoveryError

if TYPE_CHECKING:
    from checkfree_ray.executor import PipelineExecutor

log = logging.getLogger(__name__)


def copy_refs(ex: PipelineExecutor, step: int | None = None) -> list | None:
    """CheckFree+: the (de)embedding copies to the swap partners, submitted after the stages' calls so far (the one
    copy path: with each step's submission, and after a recovery). None when nothing is due."""
    if ex.strategy != "checkfree+" or (step is not None and step % ex.spec.recovery.copy_every != 0):
        return None
    S, a = ex.S, ex.actors
    return [
        a[1].hold_copy.remote(a[0].get_state.remote((EMBED,))),
        a[S - 2].hold_copy.remote(a[S - 1].get_state.remote((HEAD,))),
    ]


def sync(ex: PipelineExecutor, pending: list | None = None) -> None:
    """CheckFree+: collect the copies submitted with the step (`pending`), or copy now (after a recovery or at
    start); redundant: back up each successor, tagged `ex.state_step`. Bounded by the step timeout; raises Ray's
    error when a stage is lost meanwhile."""
    S, a = ex.S, ex.actors
    copies = pending if pending is not None else copy_refs(ex)
    if copies is not None:
        ex.history.costs["copy_bytes_held"] = float(sum(ray.get(copies, timeout=ex.step_timeout())))
    if ex.strategy == "redundant":
        start = time.perf_counter()
        backups = [
            a[i].hold_backup.remote(a[(i + 1) % S].get_state.remote(include_optim=True), ex.state_step)
            for i in range(S)
        ]
        held = ray.get(backups, timeout=ex.step_timeout())
        costs = ex.history.costs
        costs["redundant_bytes_held"] = float(sum(held))
        costs["redundant_bytes_sent_per_step"] = float(sum(held))
        costs["redundant_sync_s_total"] = (
            costs.get("redundant_sync_s_total", 0.0) + time.perf_counter() - start
        )


def sync_commit(ex: PipelineExecutor, step: int, loss: float, norms: list[dict | None]) -> None:
    """The copies and backups of `step`, after every stage stepped: part of its commit. A stage lost meanwhile
    (dead, or silent past the bound: then killed) raises `StageLost` in the optimizer phase with the step's
    `norms` and `loss`, so that the step is rolled forward or run again, never half committed."""
    pending, ex._pending_copies = ex._pending_copies, None
    try:
        sync(ex, pending=pending)
    except ray.exceptions.RayError as exc:
        detected_at = time.monotonic()
        ex.abandon(list(pending or []))
        dead, silent = unanswering(ex.actors, min(PING_TIMEOUT_S, ex.step_timeout()))
        for stage in silent:
            log.warning(
                "stage %d did not answer a ping while step %d's copies were made; killing it", stage, step
            )
            ray.kill(ex.actors[stage], no_restart=True)
        lost = sorted(set(dead) | set(silent))
        if not lost:
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                raise RecoveryError(
                    f"the copies and backups of step {step} did not finish within {ex.step_timeout():.1f}s although "
                    "every stage answers; raise `recovery.step_timeout_s`"
                ) from None
            raise
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
