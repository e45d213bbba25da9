"""Thin Ray Tune trials: ask the evaluator pool to score one candidate, report its FID.

The optimiser (Nevergrad behind Tune's searcher) never learns how FID is computed, and the evaluator
never learns which optimiser asked: the trial only maps the free values to coefficients and back. The trial
runs in its own process and reaches the pool through its service actor (`lcsc_ray.pool.PoolService`); it never
holds an evaluator itself, so a trial process that dies leaks nothing.
"""

from __future__ import annotations

import math
import time

import ray
from ray import tune

from lcsc_ray.coefficients import normalized_sum_problem, to_alphas
from lcsc_ray.evaluation_records import Job
from schemas.errors import LcscCheckfreeError

# Reported for a candidate whose samples are NaN/inf (it diverged): a legitimate, very bad score, so the
# optimiser learns to avoid that region instead of never hearing about it.
NONFINITE_FID = 1.0e4
# A trial needs no CPU (evaluators hold the cores) but Tune needs a non-empty resource request.
TRIAL_RESOURCES = {"cpu": 0, "memory": 16 * 1024 * 1024}


class TrialFailedError(LcscCheckfreeError):
    """A candidate could not be evaluated (an error in the evaluation, or lost evaluators on both attempts)."""


def trial_metrics(config: dict, record: dict, start: float) -> dict:
    """What a trial reports to Tune: the evaluation record, with a non-finite FID as NONFINITE_FID."""
    fid = record["fid"] if record["status"] == "ok" and math.isfinite(record["fid"]) else NONFINITE_FID
    return {**record, "fid": fid, "label": config.get("label", "search"), "trial_s": time.monotonic() - start}


def evaluate_candidate(
    config: dict,
    *,
    service,
    names: list[str],
    parametrization: str,
    num_samples: int,
    seed: int,
    wait_s: float,
) -> None:
    """Tune trainable: score one coefficient vector through the pool (which replays a stored evaluation, and
    retries once elsewhere when an evaluator hangs or dies)."""
    start = time.monotonic()
    free = [config[name] for name in names]
    problem = normalized_sum_problem(free, parametrization)
    if problem:  # scored as failed, with its reason, instead of evaluating blown-up coefficients
        raise TrialFailedError(f"candidate {[round(float(x), 6) for x in free]}: {problem}")
    alphas = to_alphas(free, parametrization)
    try:
        record = ray.get(service.evaluate.remote(Job.of(alphas, num_samples, seed)), timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        raise TrialFailedError(f"the evaluator pool did not answer within {wait_s:.0f} s") from None
    if record["status"] == "failed":
        raise TrialFailedError(f"candidate {[round(a, 6) for a in alphas]}: {record['reason']}")
    tune.report(trial_metrics(config, record, start))


def trainable(service, names: list[str], parametrization: str, num_samples: int, seed: int, wait_s: float):
    """The Tune trainable with its resources and bound parameters."""
    bound = tune.with_parameters(
        evaluate_candidate,
        service=service,
        names=names,
        parametrization=parametrization,
        num_samples=num_samples,
        seed=seed,
        wait_s=wait_s,
    )
    return tune.with_resources(bound, TRIAL_RESOURCES)
