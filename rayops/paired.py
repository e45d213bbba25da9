"""Paired comparisons over shared seeds: the mean difference with a 95% Student-t interval.

Two models scored on the same noise seeds (LCSC's held-out seeds, CheckFree's benchmark seeds) differ far less
from each other than each varies with the seed, so the honest question is about the per-seed differences
d_i = a_i - b_i: their mean, and the interval mean ± t_{0.975, n-1} · sd(d) / sqrt(n). A verdict "a beat b"
(`PairedDifference.verdict`: win, tie or loss) is only claimed when that interval excludes 0 on the better side.
Every score must be finite: an inf (a diverged or lost evaluation) has no difference to average, so it is refused
by name (`NonFiniteScoreError`) instead of becoming a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

CONFIDENCE = 0.95
Better = Literal["lower", "higher"]  # which side of the reference is better for the compared score
Verdict = Literal["win", "tie", "loss"]


class NonFiniteScoreError(ValueError):
    """A paired comparison was given an inf or NaN score."""


def nonfinite_scores(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> str:
    """'' when every score of `a` and `b` is finite, else which are not, e.g. "b[1] = inf" (index = seed's place)."""
    bad = [
        f"{name}[{i}] = {float(v)}"
        for name, values in zip(names, (a, b))
        for i, v in enumerate(values)
        if not math.isfinite(float(v))
    ]
    return ", ".join(bad)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over shared seeds and its confidence interval (NaN bounds with fewer than 2 seeds)."""

    mean: float
    low: float
    high: float
    num_seeds: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a real difference at this confidence)."""
        return self.low > 0 or self.high < 0

    @property
    def has_interval(self) -> bool:
        """True with an interval (at least 2 seeds); a verdict without one is always a tie."""
        return self.num_seeds >= 2

    def verdict(self, better: Better, reference: float = 0.0) -> Verdict:
        """'win' when the whole interval lies strictly on the `better` side of `reference` (a - b below it when
        lower is better, e.g. FID or loss; above it when higher is better, e.g. a speed-up), 'loss' when it lies
        strictly on the other side, else 'tie' (it touches or spans `reference`, or there is no interval). The
        one place a verdict is drawn: LCSC's comparisons and every benchmark's paired table read it from here."""
        if better not in ("lower", "higher"):
            raise ValueError(f"`better` must be 'lower' or 'higher', got {better!r}")
        if not self.has_interval:
            return "tie"
        if not all(math.isfinite(v) for v in (self.mean, self.low, self.high)):
            raise NonFiniteScoreError(
                f"a verdict needs a finite interval, got mean {self.mean} in [{self.low}, {self.high}] over "
                f"{self.num_seeds} seeds: compute it with `paired_difference`, which refuses non-finite scores"
            )
        below, above = self.high < reference, self.low > reference
        if not (below or above):
            return "tie"
        return "win" if below == (better == "lower") else "loss"


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """Mean of `a[i] - b[i]` with a two-sided Student-t interval at `confidence` (pairs share seed i)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need one value per seed on both sides, got {len(a)} and {len(b)}")
    problem = nonfinite_scores(a, b)
    if problem:
        raise NonFiniteScoreError(
            f"paired scores must be finite, got {problem}: leave that model (or seed) out of "
            "the comparison, or score it again"
        )
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def seeds_to_resolve(diff: PairedDifference, margin: float, confidence: float = CONFIDENCE) -> int | None:
    """How many seeds the interval would need to be narrower than ±`margin`, at the spread of the differences
    `diff` measured (its sd recovered from its interval): what a "tie" would cost to resolve. None without an
    interval; the seeds `diff` has when it is already that narrow."""
    if not diff.has_interval or margin <= 0:
        return None
    n = diff.num_seeds
    sd = (diff.high - diff.mean) * math.sqrt(n) / float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    need = n
    while float(stats.t.ppf(0.5 + confidence / 2, need - 1)) * sd / math.sqrt(need) >= margin:
        need += 1
    return need
