"""Hybrid recovery (`recovery.strategy: hybrid`): CheckFree+ rebuilds every single-stage loss; asynchronous
checkpoints (`saving.py`) catch what it cannot rebuild (two adjacent stages lost together roll back to the latest
one), and their interval follows Young/Daly from the measured save cost and the failures seen so far.

Young (1974), first-order optimum checkpoint interval, as Daly (2006) writes it:

    T_opt = sqrt(2 x C x M)

C the seconds a checkpoint costs, M the mean seconds between failures that need one. Under hybrid only a loss that
CheckFree+ cannot rebuild needs the checkpoint: two adjacent stages lost in the same step. With each stage lost
independently at rate lam (per second) and steps of t seconds, that happens at the rate (S-1) (lam t)^2 / t
(S-1 adjacent pairs, each pair's two stages in one step), and every rollback seen adds to it directly.

The rates are Gamma-Poisson estimates: a prior worth one failure (its source said in every record), updated with
the failures and rollbacks seen so far, so the interval is re-tuned as failures come in. C is the mean measured
seconds from a save's start until its manifest is written: for asynchronous saves, which overlap with training,
an upper bound of what the save holds the step (so the interval errs long, never short).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REBUILD_STRATEGY = "checkfree+"  # what rebuilds a single-stage loss under hybrid
DEFAULT_HOURLY_RATE = (
    0.05  # prior when neither the spec nor the user says: the paper's lowest rate, 5%/hour/stage
)
FIRST_EVERY = 100  # steps between checkpoints until a save and a step are measured (at most the high bound)
# Bounds of the interval in steps: the low one also fits one save in flight; `checkpointing.every`, when set, is
# the high one (the most steps a user accepts to lose to a rollback).
MIN_EVERY, MAX_EVERY = 2, 1000


def rebuild_strategy(strategy: str) -> str:
    """The strategy whose stage rebuilds `strategy` uses: CheckFree+'s for hybrid, else the strategy itself."""
    return REBUILD_STRATEGY if strategy == "hybrid" else strategy


def young_daly_interval_s(save_cost_s: float, mtbf_s: float) -> float:
    """Young/Daly's first-order optimum seconds between checkpoints: sqrt(2 x C x M) (Daly 2006, eq. 1)."""
    if save_cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"save cost ({save_cost_s}) must be >= 0 and MTBF ({mtbf_s}) > 0")
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def interval_steps(interval_s: float, step_s: float, low: int = MIN_EVERY, high: int = MAX_EVERY) -> int:
    """`interval_s` in whole steps of `step_s` seconds, clamped to [low, high]."""
    if step_s <= 0:
        raise ValueError(f"the step time must be positive, got {step_s}")
    steps = interval_s / step_s
    return int(min(high, max(low, round(steps)))) if math.isfinite(steps) else high


def gamma_rate(prior_rate: float, events: int, exposure_s: float) -> float:
    """Posterior mean of a Poisson rate with a Gamma prior worth one event at `prior_rate`:
    (1 + events) / (1 / prior_rate + exposure_s)."""
    if prior_rate <= 0:
        raise ValueError(f"the prior rate must be positive, got {prior_rate}")
    return (1.0 + events) / (1.0 / prior_rate + max(0.0, exposure_s))


def adjacent_loss_rate(stage_rate: float, num_stages: int, step_s: float) -> float:
    """Rate (per second) at which two adjacent stages are lost in the same step: (S-1) (lam t)^2 / t."""
    return (num_stages - 1) * stage_rate * stage_rate * step_s


def prior_stage_rate(
    expected_mtbf_s: float | None,
    hourly_rate: float | None,
    probability_per_step: float | None,
    step_s: float,
) -> tuple[float, str]:
    """The prior loss rate of one stage (per second) and where it comes from, in this precedence:
    `recovery.expected_mtbf_s`, the spec's failure model (`failures.hourly_rate`, `failures.probability_per_step`
    at the measured step time), else the paper's lowest rate (5% per stage per hour)."""
    if expected_mtbf_s is not None:
        return 1.0 / expected_mtbf_s, f"recovery.expected_mtbf_s={expected_mtbf_s:g}s"
    if hourly_rate:
        return -math.log1p(-min(hourly_rate, 1 - 1e-12)) / 3600.0, f"failures.hourly_rate={hourly_rate:g}"
    if probability_per_step:
        rate = -math.log1p(-min(probability_per_step, 1 - 1e-12)) / step_s
        return rate, f"failures.probability_per_step={probability_per_step:g} at {step_s:.3g}s/step"
    return -math.log1p(-DEFAULT_HOURLY_RATE) / 3600.0, f"default {DEFAULT_HOURLY_RATE:.0%}/hour per stage"


@dataclass(frozen=True)
class Observed:
    """What the run measured so far, as the policy needs it."""

    elapsed_s: float  # training seconds so far (the exposure)
    step_s: float  # median seconds per committed step
    save_cost_s: float | None  # mean seconds per completed save; None before one completed
    failures: int  # stage losses seen (drain hand-offs are not losses)
    rollbacks: int  # rollbacks seen (losses CheckFree+ could not rebuild)


def decide(
    observed: Observed, num_stages: int, prior: tuple[float, str], low: int = MIN_EVERY, high: int = MAX_EVERY
) -> dict[str, Any]:
    """The checkpoint interval for what was `observed` and the reasons, as a record (`schemas.train_result.CheckpointInterval`
    fields but `step`)."""
    prior_rate, source = prior
    stage_rate = gamma_rate(
        prior_rate, observed.failures, num_stages * observed.elapsed_s
    )  # S stages exposed
    modelled = adjacent_loss_rate(stage_rate, num_stages, observed.step_s)
    rollback_rate = gamma_rate(modelled, observed.rollbacks, observed.elapsed_s) if modelled > 0 else 0.0
    mtbf_s = 1.0 / rollback_rate if rollback_rate > 0 else math.inf
    save_s = observed.save_cost_s or 0.0
    low = max(low, math.ceil(save_s / observed.step_s))  # one save in flight at a time
    interval_s = young_daly_interval_s(save_s, mtbf_s) if math.isfinite(mtbf_s) else math.inf
    every = interval_steps(interval_s, observed.step_s, low, max(low, high))
    reason = (
        f"Young/Daly sqrt(2 x save {save_s:.3g}s x MTBF {mtbf_s:.4g}s) = {interval_s:.4g}s = {every} steps of "
        f"{observed.step_s:.3g}s (bounds {low}..{max(low, high)}); MTBF of losses CheckFree+ cannot rebuild "
        f"(two adjacent of {num_stages} stages in one step) from a stage loss rate of {stage_rate:.3g}/s "
        f"(prior {source}, {observed.failures} losses in {observed.elapsed_s:.4g}s seen) and "
        f"{observed.rollbacks} rollbacks seen"
    )
    return {
        "every": every,
        "interval_s": interval_s if math.isfinite(interval_s) else None,
        "save_cost_s": save_s,
        "mtbf_s": mtbf_s if math.isfinite(mtbf_s) else None,
        "stage_mtbf_s": 1.0 / stage_rate,
        "failures_seen": observed.failures,
        "rollbacks_seen": observed.rollbacks,
        "prior": source,
        "reason": reason,
    }


def observe(history, num_stages: int) -> Observed | None:
    """`Observed` from the executor's `History`; None before a step was measured."""
    if not history.step_times:
        return None
    times = sorted(history.step_times)
    costs = history.costs
    saves = costs.get("checkpoint_saves", 0.0)
    save_cost = costs.get("checkpoint_save_s_total", 0.0) / saves if saves else None
    rollbacks = {(f.step, f.rolled_back_to) for f in history.failures if f.rolled_back_to is not None}
    losses = sum(
        f.method != "handoff" for f in history.failures
    )  # a drain hand-off moves a stage, nothing lost
    elapsed = history.wall_times[-1] - (history.wall_times[0] - history.step_times[0])  # from step 1's start
    return Observed(elapsed, times[len(times) // 2], save_cost, losses, len(rollbacks))


@dataclass
class HybridPolicy:
    """When the next checkpoint save starts: every `every` steps, `every` re-tuned (`decide`) before each
    decision; each change is appended to the history's `checkpoint_intervals` with its reasons."""

    num_stages: int
    expected_mtbf_s: float | None = None
    hourly_rate: float | None = None
    probability_per_step: float | None = None
    every: int = FIRST_EVERY
    max_every: int = MAX_EVERY
    last_start: int | None = None  # step of the last save started (or restored)

    @classmethod
    def from_spec(cls, spec) -> HybridPolicy:
        """The policy of a `TrainSpec` whose strategy is hybrid."""
        high = spec.checkpointing.every or MAX_EVERY
        return cls(
            spec.pipeline.num_stages,
            spec.recovery.expected_mtbf_s,
            spec.failures.hourly_rate,
            spec.failures.probability_per_step,
            min(FIRST_EVERY, high),
            high,
        )

    def retune(self, step: int, history) -> None:
        """Set `every` from what `history` measured (no change before a save and a step were measured)."""
        observed = observe(history, self.num_stages)
        if observed is None or observed.save_cost_s is None:
            return
        prior = prior_stage_rate(
            self.expected_mtbf_s, self.hourly_rate, self.probability_per_step, observed.step_s
        )
        record = decide(observed, self.num_stages, prior, high=self.max_every)
        records = history.checkpoint_intervals
        if (
            not records or record["every"] != records[-1]["every"]
        ):  # a change (the prior's text may carry t_step)
            records.append({"step": step, **record})
            log.info("step %d: checkpoint every %d steps: %s", step, record["every"], record["reason"])
        self.every = record["every"]
        history.costs["hybrid_checkpoint_every"] = float(
            self.every
        )  # the latest choice, beside the other costs

    def due(self, step: int, history) -> bool:
        """Whether a save starts after committing `step` (step 0: the run's first checkpoint)."""
        if step == 0:
            self.last_start = 0
            return True
        if self.last_start is None or step <= self.last_start:  # resumed from, or rolled back to, step - 1
            self.last_start = step - 1
        self.retune(step, history)
        if step - self.last_start >= self.every:
            self.last_start = step
            return True
        return False
