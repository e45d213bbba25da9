"""Table 2's scaling model, as pure functions: affine fits of measured costs with bootstrap intervals, and the
expected seconds per useful step of each strategy under the paper's failure model (used by table2_extrapolate.py;
the model and its assumptions are written out there)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ----- the fit ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AffineFit:
    """t = intercept + slope x size, with 95% bootstrap intervals of both."""

    intercept: float
    slope: float
    intercept_ci: tuple[float, float]
    slope_ci: tuple[float, float]

    def __call__(self, size: float, which: str = "mean") -> float:
        """The fitted value at `size`: 'mean', or 'low'/'high' (both coefficients at their interval's end)."""
        if which == "mean":
            return self.intercept + self.slope * size
        i = 0 if which == "low" else 1
        return max(0.0, self.intercept_ci[i]) + max(0.0, self.slope_ci[i]) * size

    def as_dict(self) -> dict:
        """JSON form."""
        return {
            "intercept": self.intercept,
            "slope": self.slope,
            "intercept_ci": list(self.intercept_ci),
            "slope_ci": list(self.slope_ci),
        }


def affine_fit(sizes: list[float], samples: list[list[float]], boot: int = 2000, seed: int = 0) -> AffineFit:
    """Least-squares t = a + b x size over every repeat of every size; the interval resamples the repeats of each
    size with replacement (the sizes stay), so it reflects the measurement noise at each size."""
    if len(sizes) < 2 or len(sizes) != len(samples) or any(not s for s in samples):
        raise ValueError("an affine fit needs at least two sizes, each with at least one measurement")

    def solve(xs: list[float], ys: list[float]) -> tuple[float, float]:
        slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
        return float(intercept), float(slope)

    xs = [x for x, ys in zip(sizes, samples) for _ in ys]
    a, b = solve(xs, [y for ys in samples for y in ys])
    rng = np.random.default_rng(seed)
    coeffs = []
    for _ in range(boot):
        ys = [float(v) for s in samples for v in rng.choice(s, size=len(s), replace=True)]
        coeffs.append(solve(xs, ys))
    arr = np.asarray(coeffs)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    return AffineFit(a, b, (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1])))


# ----- the expected-time model -----------------------------------------------------------------------------------
def failure_probability(hourly: float, step_s: float) -> float:
    """Per stage per step: 1 - (1 - h)^(step_s / 3600) (the paper's conversion)."""
    if not 0 <= hourly < 1 or step_s <= 0:
        raise ValueError(f"hourly rate must be in [0, 1) and step time positive, got {hourly}, {step_s}")
    return 1.0 - (1.0 - hourly) ** (step_s / 3600.0)


@dataclass(frozen=True)
class SizeCosts:
    """Per-step inputs of the expected-time model at one size (seconds)."""

    step_s: float  # B: one plain pipeline step
    plus_extra_s: float  # CheckFree+'s swap hops and (de)embedding copies per step
    save_s: float  # one checkpoint save
    stages: int
    checkpoint_every: int
    recovery_s: float


def seconds_per_useful_step(strategy: str, c: SizeCosts, f: float, g: float = 1.0, e: float = 0.0) -> float:
    """Expected wall seconds per step of progress (module docstring) under f failures per step."""
    B, K, R, S = c.step_s, c.checkpoint_every, c.recovery_s, c.stages
    rollback = K / 2 * B + R
    if strategy == "checkpoint":
        return B + c.save_s / K + f * rollback
    if strategy == "checkfree+":
        return g * (B + c.plus_extra_s + f * (R + e * B))
    if strategy == "checkfree":
        middle = (S - 2) / S
        return g * (B + f * (middle * (R + e * B) + (1 - middle) * rollback)) + c.save_s / K
    raise ValueError(f"unknown strategy {strategy!r}: one of checkpoint, checkfree, checkfree+")


def speedup(strategy: str, c: SizeCosts, hourly: float, g: float = 1.0, e: float = 0.0) -> float:
    """Modelled speed-up of `strategy` over checkpointing (hours to the target, checkpointing / strategy)."""
    f = c.stages * failure_probability(hourly, c.step_s)
    return seconds_per_useful_step("checkpoint", c, f) / seconds_per_useful_step(strategy, c, f, g, e)


def plus_extra_seconds(
    hop: AffineFit,
    micro_batches: int,
    activation_bytes: float,
    embedding_bytes: float,
    copy_every: int,
    which,
) -> float:
    """CheckFree+'s extra seconds per step: half the micro-batches swapped, 4 extra hops each (2 forward,
    2 backward) of one activation, plus the embedding's and head's copies every `copy_every` steps."""
    swapped = micro_batches // 2  # odd micro-batches run swapped (recovery_rules.micro_batch_order)
    return 4 * swapped * hop(activation_bytes, which) + 2 * hop(embedding_bytes, which) / copy_every


@dataclass(frozen=True)
class LinkHop:
    """A hop over a link: the fitted per-call latency plus bytes at `bandwidth` (bytes/s)."""

    fit: AffineFit
    bandwidth: float

    def __call__(self, size: float, which: str = "mean") -> float:
        """Seconds to send `size` bytes."""
        latency = {
            "mean": self.fit.intercept,
            "low": self.fit.intercept_ci[0],
            "high": self.fit.intercept_ci[1],
        }
        return max(0.0, latency[which]) + size / self.bandwidth


# ----- steps: convergence slowdown and damage per rebuild from Table 2's runs ---------------------------------
def slowdown_fit(runs: dict, strategy: str, boot: int = 2000, seed: int = 0) -> dict:
    """Least squares of steps_to_target(strategy) - steps_to_target(none, same seed) = (g - 1) N0 + e x rebuilds
    over Table 2's runs (every rate); g: the convergence slowdown without failures, e: extra steps per recovery.
    95% intervals by bootstrap over runs."""
    none = {r["seed"]: r["steps_to_target"] for r in runs["reference"] if r["reached"]}
    rows = [
        (none[r["seed"]], r["recoveries"], r["steps_to_target"] - none[r["seed"]])
        for rate in runs["runs"].values()
        for r in rate
        if r["strategy"] == strategy and r["reached"] and r["seed"] in none
    ]
    if len(rows) < 3:
        raise ValueError(f"Table 2's runs hold {len(rows)} reached runs of {strategy}; need 3 to fit g and e")
    X = np.asarray([[n0, k] for n0, k, _ in rows], float)
    y = np.asarray([d for _, _, d in rows], float)

    def solve(idx) -> tuple[float, float]:
        coef, *_ = np.linalg.lstsq(X[idx], y[idx], rcond=None)
        return 1.0 + float(coef[0]), float(coef[1])

    g, e = solve(np.arange(len(rows)))
    rng = np.random.default_rng(seed)
    samples = np.asarray([solve(rng.integers(0, len(rows), len(rows))) for _ in range(boot)])
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return {
        "g": g,
        "e": e,
        "g_ci": [float(lo[0]), float(hi[0])],
        "e_ci": [float(lo[1]), float(hi[1])],
        "runs": len(rows),
    }
