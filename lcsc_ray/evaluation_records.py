"""What the evaluator pool evaluates and returns: a job (coefficients, sample count, noise seed), the one shape
of an evaluation's record, and how long one evaluation may take."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lcsc_ray.timeouts import FIRST_TIMEOUT_S

TIMEOUT_FACTOR, TIMEOUT_FLOOR_S = 5.0, 60.0
# a continued evaluation's FID at infinite samples, its fit (slope c, the (n, FID_n) points) and the samples it
# drew (its increment over the stored blocks it continued)
EXTRA_FIELDS = ("fid_inf", "fid_slope", "fit_points", "samples_drawn")


@dataclass(frozen=True)
class Job:
    """One evaluation: coefficients (None: the run's EMA weights), sample count, noise seed."""

    alphas: tuple[float, ...] | None
    num_samples: int
    seed: int
    continued: bool = False  # scored in chunk blocks that continue the candidate's stored ones (and kept)

    @classmethod
    def of(cls, alphas: Sequence[float] | None, num_samples: int, seed: int, continued: bool = False) -> Job:
        """A job with coefficients as plain floats."""
        return cls(
            None if alphas is None else tuple(float(a) for a in alphas),
            int(num_samples),
            int(seed),
            bool(continued),
        )


def evaluation_timeout(
    num_samples: int, configured_s: float | None, slowest: tuple[float, int] | None
) -> float:
    """Seconds one evaluation of `num_samples` may take: the spec's value, else 5x the slowest timed evaluation so
    far per sample (`slowest` = (seconds, its sample count)) scaled up to `num_samples`, at least 60 s; before any
    is timed, 900 s. Following the slowest, not the first, lets the limit rise with the load of shared cores."""
    if configured_s is not None:
        return float(configured_s)
    if slowest is None:
        return FIRST_TIMEOUT_S
    seconds, samples = slowest
    return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * seconds * max(1.0, num_samples / max(samples, 1)))


def slowest_timing(slowest: tuple[float, int] | None, seconds: float, num_samples: int) -> tuple[float, int]:
    """The slower per sample of the slowest timing so far, (seconds, sample count), and a new one."""
    if slowest is None or seconds * slowest[1] > slowest[0] * num_samples:
        return (seconds, num_samples)
    return slowest


def evaluation_record(
    job: Job,
    fid: float,
    status: str,
    reason: str = "",
    evaluator: int = -1,
    eval_s: float = math.nan,
    attempts: int = 0,
    replayed: bool = False,
    extra: dict | None = None,
) -> dict:
    """The one shape of an evaluation's result, for trials, rungs, final scores and the store.
    status: 'ok', 'nonfinite' (the combination diverged; fid is inf) or 'failed' (reason says why).
    `extra` sets the continued evaluations' fields (`EXTRA_FIELDS`): FID_inf, its fit, the samples drawn."""
    return {
        "fid": float(fid),
        "status": status,
        "reason": reason,
        "alphas": None if job.alphas is None else list(job.alphas),
        "num_samples": job.num_samples,
        "seed": job.seed,
        "evaluator": evaluator,
        "eval_s": float(eval_s),
        "attempts": attempts,
        "replayed": replayed,
        "fid_inf": math.nan,
        "fid_slope": math.nan,
        "fit_points": [],
        "samples_drawn": job.num_samples,
        **{k: v for k, v in (extra or {}).items() if k in EXTRA_FIELDS},
    }


def stored_record(job: Job, stored: dict) -> dict:
    """A stored result as an evaluation record (records written before the record shape had a status too)."""
    if "status" in stored:
        status, reason = stored["status"], stored.get("reason", "")
    else:
        status = "ok" if math.isfinite(float(stored["fid"])) else "nonfinite"
        reason = ""
    return evaluation_record(
        job,
        float(stored["fid"]) if status == "ok" else math.inf,
        status,
        reason,
        int(stored.get("evaluator", -1)),
        float(stored.get("eval_s", math.nan)),
        int(stored.get("attempts", 0)),
        replayed=True,
        extra={k: stored[k] for k in EXTRA_FIELDS if k in stored},
    )
