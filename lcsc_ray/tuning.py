"""Ray Tune plumbing of the search: search space, Nevergrad optimiser, resumable phases, progress."""

from __future__ import annotations

import logging
import os

import nevergrad as ng
import numpy as np
import pandas as pd
from ray import tune
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.nevergrad import NevergradSearch

from rayops.progress import ProgressLine
from schemas.search import SearchSpec

log = logging.getLogger(__name__)
METRIC, MODE = "fid", "min"
# Tune's own console tables would interleave with our progress line; its CSV and JSON logs are kept.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def free_names(dimension: int) -> list[str]:
    """Names of the free coefficients in Tune configs: x000, x001, ..."""
    return [f"x{i:03d}" for i in range(dimension)]


def search_space(names: list[str], bound: float, labels: list[str] | None = None) -> dict:
    """Tune's space over the free values, plus the candidate's label: one of `labels` (the seeds' own), or
    "search" for the optimiser's proposals."""
    label = tune.choice(labels) if labels else "search"
    return {**{name: tune.uniform(-bound, bound) for name in names}, "label": label}


def build_optimizer(spec: SearchSpec, start: np.ndarray, budget: int, num_workers: int) -> ng.optimizers.base.Optimizer:
    """The spec's Nevergrad optimiser over [-bound, bound]^d, started at `start` with step size `sigma`."""
    bound = spec.search.bound
    init = np.clip(np.asarray(start, dtype=np.float64), -bound, bound)
    parametrization = ng.p.Array(init=init, lower=-bound, upper=bound).set_mutation(sigma=spec.search.sigma)
    parametrization.random_state = np.random.RandomState(spec.seed)
    optimizer_class = ng.optimizers.registry[spec.search.optimizer]
    return optimizer_class(parametrization=parametrization, budget=max(budget, 1), num_workers=num_workers)


def seed_searcher(points: list[dict], max_concurrent: int) -> BasicVariantGenerator:
    """Evaluates exactly the given points (the search's seed vectors), `max_concurrent` at a time: one trial
    per evaluator, so Tune reuses that many trial actors instead of starting a process for every seed."""
    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent)


def nevergrad_searcher(optimizer, names: list[str], max_concurrent: int) -> ConcurrencyLimiter:
    """Ray's NevergradSearch over our optimiser. It flips the metric's sign in one place
    (`_metric_op`, +1 for mode='min'): FID is minimised, as Nevergrad does natively."""
    searcher = NevergradSearch(optimizer=optimizer, space=names, metric=METRIC, mode=MODE)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


class SearchProgress(Callback):
    """Prints trials done out of the budget, the best FID so far and an ETA."""

    def __init__(self, progress: ProgressLine, offset: int = 0, best: float = float("inf")):
        self.progress, self.offset, self.best = progress, offset, best
        self.done = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """One trial reported its FID."""
        self.done += 1
        if result.get("status") == "ok":
            self.best = min(self.best, float(result[METRIC]))
        self.progress.update(done=self.offset + self.done, best_fid=self.best, last_fid=float(result[METRIC]))

    def on_trial_error(self, iteration, trials, trial, **info):
        """A trial failed after its retry."""
        self.done += 1
        self.progress.emit(f"trial {trial.trial_id} failed: {trial.error_file or 'see Tune logs'}")
        self.progress.update(done=self.offset + self.done, force=True)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # the default embeds every coefficient and overflows name limits


def run_phase(name: str, storage_path: str, trainable, searcher, space: dict, num_samples: int,
              callbacks: list[Callback]) -> pd.DataFrame:
    """Run (or resume) one Tune experiment; return one row per trial, errored trials included."""
    path = f"{storage_path.rstrip('/')}/{name}"
    # A searcher with its own space (Nevergrad) takes only the constant label from Tune's param_space.
    tuner_space = space if isinstance(searcher, BasicVariantGenerator) else {"label": "search"}
    if tune.Tuner.can_restore(path):
        log.info("resuming Tune experiment %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, param_space=tuner_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tuner_space,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples, metric=METRIC, mode=MODE,
                                        reuse_actors=True, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(storage_path=storage_path, name=name, verbose=0, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    return _grid_rows(grid, name)


def error_summary(error: BaseException, limit: int = 500) -> str:
    """One line naming a failed trial's root cause (a Ray task error's cause, not its traceback)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:limit]


def _grid_rows(grid, phase: str) -> pd.DataFrame:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        row = {
            "trial_id": metrics.get("trial_id") or getattr(result, "path", "").rsplit("/", 1)[-1],
            "phase": phase,
            "label": metrics.get("label", config.get("label", "search")),
            "fid": metrics.get(METRIC, float("nan")),
            "alphas": metrics.get("alphas"),
            "num_samples": metrics.get("num_samples"),
            "seed": metrics.get("seed"),
            "duration_s": metrics.get("trial_s", float("nan")),
            "eval_s": metrics.get("eval_s", float("nan")),
            "status": "failed" if result.error else metrics.get("status", "ok"),
            "reason": error_summary(result.error) if result.error else metrics.get("reason", ""),
            "config": {k: v for k, v in config.items() if k != "label"},
        }
        rows.append(row)
    return pd.DataFrame(rows)
