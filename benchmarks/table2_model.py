"""Table 2's cost model, as pure functions: measured costs, the modelled time, and intervals over seeds.

Every strategy is charged the same way. From runs without failures at the benchmark's size we measure each
strategy's seconds per step c_s (the wall time between commits, so CheckFree+'s swap and (de)embedding copies,
redundant computation's replication and checkpointing's save stall are all in it) and, from scheduled kills,
each recovery's extra seconds r_s,m by recovery method m (detection + rebuild + the retried step, beyond the
step it replaces). These *relative* costs are applied to one base iteration time B (the paper's checkpointing
iteration, 91.5 s):

    modelled_s = B * (c_s / c_ckpt) * (steps_to_target + lost_steps) + B * sum_m r_s,m / c_ckpt

steps_to_target is the committed step at which the validation loss first reached the target, lost_steps the
steps run again after rollbacks (the lost work), and the sum runs over the run's recoveries. So a strategy 14%
slower per step than checkpointing here is 14% slower per modelled step, and a recovery that costs 3 measured
checkpointing steps costs 3 x 91.5 s.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rayops.paired import PairedDifference, Verdict, paired_difference

PAPER_BASE_ITER_S = 91.5  # the paper's seconds per checkpointing iteration (500M LLaMa, Table 2's setting)
PAPER_RECOVERY_S = 30.0  # the paper's seconds per recovery (used only for the sensitivity column)


@dataclass(frozen=True)
class StrategyCosts:
    """One strategy's measured costs: seconds per step without failures, extra seconds per recovery by kind
    ('method/warm' or 'method/cold', see `checkfree_setup.recovery_kind`)."""

    step_s: float
    recovery_s: dict[str, float] = field(default_factory=dict)

    def recovery(self, method: str) -> float:
        """Seconds of a recovery of kind `method` ('copy/warm': method/standby); when that kind was not measured,
        the mean over the same method's measured kinds, else over every measured kind."""
        if method in self.recovery_s:
            return self.recovery_s[method]
        same = [s for kind, s in self.recovery_s.items() if kind.split("/")[0] == method.split("/")[0]]
        if same:
            return math.fsum(same) / len(same)
        if not self.recovery_s:
            raise ValueError(
                f"no recovery time measured for this strategy, needed for a '{method}' recovery; "
                "run the cost measurement with scheduled kills (paper_table2.py costs)"
            )
        return math.fsum(self.recovery_s.values()) / len(self.recovery_s)


def step_seconds(steps: Sequence[int], wall_times: Sequence[float], window: tuple[int, int]) -> float:
    """Mean seconds per committed step over steps window[0]..window[1], from the commit before the window's first
    step to the window's last (so a save stall inside the window is included); the window must be failure-free."""
    diffs = step_intervals(steps, wall_times, window)
    return math.fsum(diffs) / len(diffs)


def step_intervals(steps: Sequence[int], wall_times: Sequence[float], window: tuple[int, int]) -> list[float]:
    """Seconds between consecutive commits for each step of the window (see `step_seconds`); their median is a
    load-robust check of the mean, blind to save stalls."""
    first, last = window
    try:
        i0 = list(steps).index(first - 1) if first > 1 else -1
        i1 = list(steps).index(last)
    except ValueError:
        raise ValueError(f"steps {first - 1}..{last} were not all committed; lengthen the cost run") from None
    if list(steps[i0 + 1 : i1 + 1]) != list(range(first, last + 1)):
        raise ValueError(
            f"the window {first}..{last} saw a failure or rollback; move the scheduled kills after it"
        )
    times = [wall_times[i0] if i0 >= 0 else 0.0, *wall_times[i0 + 1 : i1 + 1]]
    return [b - a for a, b in itertools.pairwise(times)]


def recovery_seconds(wall_times: Sequence[float], kill_offset: float, step_s: float) -> float:
    """Extra seconds a kill at `kill_offset` (seconds since the run's start) cost: the gap between the commits
    around it, less the one step that gap would hold without the failure."""
    before = max((t for t in wall_times if t <= kill_offset), default=0.0)
    after = min((t for t in wall_times if t > kill_offset), default=None)
    if after is None:
        raise ValueError(f"no step committed after the kill at {kill_offset:.2f}s; lengthen the cost run")
    return after - before - step_s


def modelled_seconds(
    steps_to_target: int,
    lost_steps: int,
    recovery_methods: Sequence[str],
    costs: StrategyCosts,
    checkpoint_step_s: float,
    base_s: float = PAPER_BASE_ITER_S,
    fixed_recovery_s: float | None = None,
) -> float:
    """The modelled time to target (module docstring): measured costs relative to checkpointing's step, x base_s.
    `fixed_recovery_s` charges every recovery that many modelled seconds instead (the paper's 30 s: a sensitivity
    check of how much the verdict rests on the measured recovery times)."""
    if checkpoint_step_s <= 0 or costs.step_s <= 0:
        raise ValueError(
            f"per-step costs must be positive, got {costs.step_s} and checkpoint {checkpoint_step_s}"
        )
    scale = base_s / checkpoint_step_s
    work = (steps_to_target + lost_steps) * costs.step_s * scale
    if fixed_recovery_s is not None:
        return work + fixed_recovery_s * len(recovery_methods)
    return work + math.fsum(costs.recovery(m) for m in recovery_methods) * scale


def seed_interval(values: Sequence[float]) -> PairedDifference:
    """Mean of per-seed values with its 95% Student-t interval (NaN bounds below 2 seeds)."""
    return paired_difference(list(values), [0.0] * len(values))


def speedup_verdict(interval: PairedDifference) -> Verdict | None:
    """A speed-up's verdict (`rayops.paired`): its interval against 1, higher is better; None without an interval
    (fewer than 2 seeds)."""
    if not interval.has_interval or math.isnan(interval.low):
        return None
    return interval.verdict("higher", reference=1.0)


def speedups(reference: Sequence[float | None], values: Sequence[float | None]) -> list[float]:
    """Per-seed speed-ups reference / value (the paper's "x faster than checkpointing"), seeds where both exist."""
    return [r / v for r, v in zip(reference, values) if r is not None and v is not None and v > 0]


def format_interval(interval: PairedDifference, spec: str = ".2f") -> str:
    """'mean [low, high] (n)', or 'mean (n)' without bounds, or '-' without values."""
    if interval.num_seeds == 0:
        return "-"
    if math.isnan(interval.low):
        return f"{interval.mean:{spec}} (n={interval.num_seeds})"
    return f"{interval.mean:{spec}} [{interval.low:{spec}}, {interval.high:{spec}}]"
