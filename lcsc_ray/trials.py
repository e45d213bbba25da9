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


def candidate_score(record: dict, score: str = "raw") -> float:
    """The number the optimiser is told and rungs rank by: the raw FID, or with `score` 'extrapolated' its
    FID_inf (the raw FID where no fit was possible); a non-finite FID is NONFINITE_FID."""
    if record["status"] != "ok" or not math.isfinite(record["fid"]):
        return NONFINITE_FID
    fid_inf = record.get("fid_inf", math.nan)
    return float(fid_inf) if score == "extrapolated" and math.isfinite(fid_inf) else float(record["fid"])


def trial_metrics(
    config: dict, record: dict, start: float, score: str = "raw", rungs: dict | None = None
) -> dict:
    """What a trial reports to Tune: the evaluation record with `fid` the candidate's score (`candidate_score`)
    and `fid_raw` the measured FID; with `rungs`, each rung's sample count and raw and extrapolated FID so far,
    the samples spent on the candidate and `samples` (its cumulative sample count, the schedulers' time). A search
    that does not extrapolate reports no `rung_fids_inf` (Tune's loggers warn on every NaN they are given)."""
    drawn = sum((rungs or {}).get("rung_drawn", [record.get("samples_drawn", record["num_samples"])]))
    rungs = {k: list(v) for k, v in (rungs or {}).items() if k != "rung_drawn"}
    if not any(math.isfinite(f) for f in rungs.get("rung_fids_inf", [])):
        rungs.pop(
            "rung_fids_inf", None
        )  # not extrapolated (a flat or raw-scored search): no list of NaNs to log
    return {
        **record,
        "fid": candidate_score(record, score),
        "fid_raw": float(record["fid"]),
        "label": config.get("label", "search"),
        "trial_s": time.monotonic() - start,
        "rung": len(rungs.get("rung_samples", [0])) - 1,
        "samples": record["num_samples"],
        "samples_spent": drawn,
        **rungs,
    }


def evaluate_candidate(
    config: dict,
    *,
    service,
    names: list[str],
    parametrization: str,
    schedule: list[int],
    seed: int,
    wait_s: float,
    continued: bool = False,
    score: str = "raw",
) -> None:
    """Tune trainable: score one coefficient vector through the pool (which replays a stored evaluation, and
    retries once elsewhere when an evaluator hangs or dies) at each sample count of `schedule`, reporting after
    each: a scheduler (ASHA) that stops the trial there ends it before the next count is drawn. `continued`
    jobs continue the candidate's stored chunk blocks and carry FID_inf (see `lcsc_ray.pool`)."""
    start = time.monotonic()
    free = [config[name] for name in names]
    problem = normalized_sum_problem(free, parametrization)
    if problem:  # scored as failed, with its reason, instead of evaluating blown-up coefficients
        raise TrialFailedError(f"candidate {[round(float(x), 6) for x in free]}: {problem}")
    alphas = to_alphas(free, parametrization)
    rungs: dict[str, list] = {"rung_samples": [], "rung_fids": [], "rung_fids_inf": [], "rung_drawn": []}
    for num_samples in schedule:
        job = Job.of(alphas, num_samples, seed, continued)
        try:
            record = ray.get(service.evaluate.remote(job), timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            raise TrialFailedError(f"the evaluator pool did not answer within {wait_s:.0f} s") from None
        if record["status"] == "failed":
            raise TrialFailedError(f"candidate {[round(a, 6) for a in alphas]}: {record['reason']}")
        rungs["rung_samples"].append(num_samples)
        rungs["rung_fids"].append(float(record["fid"]))
        rungs["rung_fids_inf"].append(float(record.get("fid_inf", math.nan)))
        rungs["rung_drawn"].append(int(record.get("samples_drawn", num_samples)))
        tune.report(trial_metrics(config, record, start, score, rungs))
        if record["status"] != "ok":
            return  # a diverged candidate is not scored again


def trainable(
    service,
    names: list[str],
    parametrization: str,
    schedule: list[int],
    seed: int,
    wait_s: float,
    continued: bool = False,
    score: str = "raw",
):
    """The Tune trainable with its resources and bound parameters."""
    bound = tune.with_parameters(
        evaluate_candidate,
        service=service,
        names=names,
        parametrization=parametrization,
        schedule=list(schedule),
        seed=seed,
        wait_s=wait_s,
        continued=continued,
        score=score,
    )
    return tune.with_resources(bound, TRIAL_RESOURCES)
