"""`run_search(spec)`: the LCSC search driver.

checkpoints -> object store -> evaluator actors
post-hoc EMA:   (with `posthoc_ema`) power-EMA snapshots join the object store; each sigma_rel of the grid is
                rebuilt from them (EDM2) and scored; the best is a baseline and, projected on the checkpoints,
                a seed
phase "seeds":  last, post-hoc EMA, EMA-shaped and uniform vectors, as Tune trials (points_to_evaluate);
                a seed whose trial errored is evaluated once more ("seeds-retry") and that attempt kept
phase "search": Nevergrad (through our Tune searcher, `tuning.ReplaySearcher`) started at the best seed, for the
                rest of the budget
rungs:          optional: asynchronous (ASHA, `search.eta`, inside the trials) or successive halving after the
                search phase; a promotion continues the candidate's stored chunk statistics
final:          winner, top-k and baselines scored at one sample count on the search seed + held-out seeds
-> SearchResult, trials.parquet, combined checkpoint, plots (written as one artifact, manifest last)
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd

from lcsc_ray import coefficients as coef
from lcsc_ray import posthoc_ema
from lcsc_ray.checkpoints import CheckpointSet, load_checkpoint_set
from lcsc_ray.evaluation_store import EvaluationStore
from lcsc_ray.export import combined_safetensors
from lcsc_ray.fid import reference_stats_for
from lcsc_ray.output_guard import Guard, guarding
from lcsc_ray.pool import EvaluatorPool, EvaluatorPoolError, Job
from lcsc_ray.run_identity import preflight, prepare_state, recorded_identity
from lcsc_ray.search_result import build_result
from lcsc_ray.search_timeline import start_timeline
from lcsc_ray.trials import TrialFailedError, candidate_score, trainable
from lcsc_ray.tuning import (
    SearchProgress,
    build_optimizer,
    free_names,
    nevergrad_searcher,
    run_phase,
    rung_scheduler,
    search_space,
    seed_searcher,
)
from rayops import artifacts, storage
from rayops.jobs import absolutize_output
from rayops.output_lock import OutputLock
from rayops.progress import ProgressLine
from rayops.session import ray_session
from schemas.search import PosthocEmaScore, SearchResult, SearchSpec

log = logging.getLogger(__name__)


def continues(spec: SearchSpec) -> bool:
    """Whether the search's candidates are scored in kept chunk blocks: with a fidelity schedule (a promotion
    continues them) or an extrapolated score (FID_inf is fitted from them)."""
    return spec.search.fidelity_schedule is not None or spec.search.fidelity_score == "extrapolated"


def _search_samples(spec: SearchSpec) -> int:
    schedule = spec.search.fidelity_schedule
    return schedule[0] if schedule else spec.fid.num_samples


def final_samples(spec: SearchSpec) -> int:
    """The one sample count at which every reported model is scored."""
    if spec.fid.holdout_num_samples:
        return spec.fid.holdout_num_samples
    schedule = spec.search.fidelity_schedule
    return schedule[-1] if schedule else spec.fid.num_samples


class SearchRun:
    """State of one search: the evaluator pool, the stored evaluations, the trials so far.

    `guard` (the output lock's `check`) is called before each state write of the driver and at each Tune step
    and result: a search whose lock was lost stops there with the lock's error, and stays resumable."""

    def __init__(self, spec: SearchSpec, checkpoint_set: CheckpointSet, guard: Guard | None = None):
        self.spec, self.checkpoints = spec, checkpoint_set
        self.guard: Guard = guard or (lambda: None)
        self.guard()
        self.pool: EvaluatorPool | None = None
        self.num_evaluators = spec.evaluators.num_actors
        self.num_checkpoints = len(checkpoint_set)
        self.parametrization = spec.search.parametrization
        self.names = free_names(coef.num_free(self.num_checkpoints, self.parametrization))
        self.out = spec.output.uri
        self.store = EvaluationStore(
            storage.join(self.out, "state", "evaluations"), identity=recorded_identity(spec)
        )

    def start_pool(self, reference: tuple[np.ndarray, np.ndarray]) -> EvaluatorPool:
        """Start the evaluator pool and probe it with the last checkpoint before any trial runs."""
        self.pool = EvaluatorPool(self.spec, self.checkpoints, reference, self.store, guard=self.guard)
        self.pool.probe(_search_samples(self.spec), self.spec.fid.seed, continues(self.spec))
        return self.pool

    def check_pool(self) -> None:
        """Stop the search with the pool's root cause when the pool stopped (trials only saw failures)."""
        stopped = self.pool.state()["stopped"]
        if stopped:
            raise EvaluatorPoolError(stopped)

    # ------------------------------------------------------------------------------------ Tune phases
    def _trainable(self):
        search = self.spec.search
        # with asynchronous rungs a trial goes up the whole schedule (until ASHA stops it); else it screens only
        schedule = search.fidelity_schedule if search.eta else [_search_samples(self.spec)]
        return trainable(
            self.pool.service,
            self.names,
            self.parametrization,
            schedule,
            self.spec.fid.seed,
            self.pool.wait_s(schedule[-1]),
            continued=continues(self.spec),
            score=search.fidelity_score,
        )

    def _scheduler(self):
        """ASHA over the fidelity schedule (`search.eta`), one per phase, or None (each trial is one score)."""
        search = self.spec.search
        return rung_scheduler(search.fidelity_schedule, search.eta) if search.eta else None

    def _point(self, label: str, alphas: np.ndarray) -> dict:
        free = coef.from_alphas(alphas, self.parametrization)
        return {**dict(zip(self.names, map(float, free))), "label": label}

    def run_trials(self, seeds: list[tuple[str, np.ndarray]], progress: ProgressLine) -> pd.DataFrame:
        """The seed phase, then the optimiser phase; resumes either from its Tune state."""
        spec = self.spec
        tune_path = storage.join(self.out, "tune")
        space = search_space(self.names, spec.search.bound, labels=[label for label, _ in seeds])
        seed_cb = SearchProgress(progress, guard=self.guard)
        seeds_df = run_phase(
            "seeds",
            tune_path,
            self._trainable(),
            seed_searcher([self._point(label, a) for label, a in seeds], self.num_evaluators),
            space,
            len(seeds),
            [seed_cb],
            self._scheduler(),
        )
        self.check_pool()
        again = seeds_to_retry(seeds_df, seeds)
        if again:
            # a seed whose trial errored (its process died) is evaluated once more, as the optimiser's proposals are
            log.info(
                "evaluating %d seed(s) again whose trial errored: %s",
                len(again),
                [label for label, _ in again],
            )
            retry_df = run_phase(
                "seeds-retry",
                tune_path,
                self._trainable(),
                seed_searcher([self._point(label, a) for label, a in again], self.num_evaluators),
                space,
                len(again),
                [seed_cb],
                self._scheduler(),
            )
            self.check_pool()
            seeds_df = merge_seed_retries(seeds_df, retry_df)
        remaining = spec.search.budget - len(seeds)
        if remaining <= 0:
            return self._finish_rows(seeds_df)
        ok = seeds_df[seeds_df.status == "ok"]
        best_alphas = (
            ok.loc[ok.fid.idxmin(), "alphas"] if len(ok) else coef.last_checkpoint(self.num_checkpoints)
        )
        start = coef.from_alphas(best_alphas, self.parametrization)
        optimizer = build_optimizer(spec, start, remaining, self.num_evaluators)
        searcher = nevergrad_searcher(
            optimizer,
            self.names,
            self.num_evaluators,
            storage.join(self.out, "state", "proposals"),
            guard=self.guard,
            in_flight_limit=self.pool.concurrency,  # follows the live pool as the cluster grows and shrinks
        )
        search_cb = SearchProgress(progress, offset=len(seeds_df), best=seed_cb.best, guard=self.guard)
        # room for each proposal's second attempt; the searcher says when the phase is finished
        search_df = run_phase(
            "search",
            tune_path,
            self._trainable(),
            searcher,
            space,
            2 * remaining,
            [search_cb],
            self._scheduler(),
        )
        self.check_pool()
        return self._finish_rows(pd.concat([seeds_df, search_df], ignore_index=True))

    def _finish_rows(self, trials: pd.DataFrame) -> pd.DataFrame:
        """Fill coefficients of failed trials from their configs; count samples; remember results."""

        def alphas_of(row):
            if row.alphas is not None and not (isinstance(row.alphas, float) and math.isnan(row.alphas)):
                return list(row.alphas)
            free = [row.config.get(name, 0.0) for name in self.names]
            return coef.to_alphas(free, self.parametrization).tolist()

        trials = trials.copy()
        trials["alphas"] = [alphas_of(row) for row in trials.itertuples()]
        trials["rung"] = trials["rung"].fillna(0).astype(int) if "rung" in trials else 0
        if "samples_spent" in trials:
            trials["samples_spent"] = trials["samples_spent"].fillna(0).astype(int)
        return trials.drop(columns=["config"])

    def run_rungs(self, trials: pd.DataFrame) -> pd.DataFrame:
        """Successive halving over `fidelity_schedule`: keep the best fraction, score again with more samples
        (continuing each candidate's stored chunk blocks: a promotion draws only the samples it adds). With
        `search.eta` the rungs were asynchronous, inside the trials (ASHA), and there is nothing left to do."""
        search = self.spec.search
        schedule = [] if search.eta else search.fidelity_schedule or []
        current = trials[trials.status == "ok"].copy()
        rows = [trials]
        for rung, n in enumerate(schedule[1:], start=1):
            keep = max(1, math.ceil(search.keep_fraction * len(current)))
            current = current.nsmallest(keep, "fid").copy()
            progress = ProgressLine(f"rung {rung} ({n} samples)", total=len(current))
            jobs = [Job.of(a, n, self.spec.fid.seed, continues(self.spec)) for a in current.alphas]
            records = self.pool.score(jobs, progress)
            fids = [candidate_score(record, search.fidelity_score) for record in records]
            current["fid"], current["num_samples"], current["rung"] = fids, n, rung
            current["fid_raw"] = [record["fid"] for record in records]
            current["fid_inf"] = [record["fid_inf"] for record in records]
            current["samples_spent"] = current["samples_spent"].to_numpy() + [
                int(record["samples_drawn"]) for record in records
            ]
            current["status"] = [
                record["status"] for record in records
            ]  # a failed re-score is not ranked as ok
            current["phase"] = f"rung{rung}"
            rows.append(current)
        return pd.concat(rows, ignore_index=True)


def seeds_to_retry(
    seeds_df: pd.DataFrame, seeds: list[tuple[str, np.ndarray]]
) -> list[tuple[str, np.ndarray]]:
    """The seeds (label, coefficients) whose trial in the seeds phase failed, in the seeds' order."""
    failed = set(seeds_df.loc[seeds_df.status == "failed", "label"]) if len(seeds_df) else set()
    return [(label, alphas) for label, alphas in seeds if label in failed]


def merge_seed_retries(seeds_df: pd.DataFrame, retry_df: pd.DataFrame) -> pd.DataFrame:
    """The seeds phase's rows with each retried seed's failed row replaced by its second attempt (in place, so
    the seeds keep their order, and in phase "seeds", where the baselines are read); a second failure stays a
    failed row."""
    retried = {row.label: {**row._asdict(), "phase": "seeds"} for row in retry_df.itertuples(index=False)}
    rows = [
        retried[row.label] if row.label in retried and row.status == "failed" else row._asdict()
        for row in seeds_df.itertuples(index=False)
    ]
    return pd.DataFrame(rows, columns=seeds_df.columns)


def _coefficients(alphas):
    return None if alphas is None else [float(a) for a in alphas]


def rescore_count(spec: SearchSpec, top_rung: pd.DataFrame) -> int:
    """How many of the best candidates to re-score. The winner is picked by its search-seed FID at the final
    sample count; when the top rung was already ranked at exactly that count and seed, re-scoring cannot change
    the pick, so only the best one is scored on the held-out seeds."""
    ranked_at = set(top_rung.num_samples.astype(int)) if "num_samples" in top_rung else set()
    if ranked_at == {final_samples(spec)}:
        return 1
    return spec.search.rescore_top_k


def reported_candidates(
    run: SearchRun,
    trials: pd.DataFrame,
    seeds: list[tuple[str, np.ndarray]],
    posthoc: dict[str, list[float]] | None = None,
) -> dict:
    """label -> alphas (None = the run's EMA): top-k of the search, last, best sparse EMA, uniform, run EMA,
    and `posthoc` (the best post-hoc EMA: zero on the checkpoints, then its snapshot weights)."""
    ok = trials[trials.status == "ok"]
    top_rung = ok[
        ok.rung == ok.rung.max()
    ]  # the highest rung with a scored row (a failed re-score is no pick)
    top = top_rung.nsmallest(rescore_count(run.spec, top_rung), "fid")
    candidates = {f"top{i + 1}": list(a) for i, a in enumerate(top.alphas)}
    seed_rows = trials[(trials.phase == "seeds") & (trials.status == "ok")]
    by_label = dict(seeds)
    candidates["last"] = by_label["last"].tolist()
    ema_rows = seed_rows[seed_rows.label.str.startswith("ema@")]
    if len(ema_rows):
        best_ema = ema_rows.loc[ema_rows.fid.idxmin()]
        candidates[f"best-sparse-{best_ema.label}"] = list(best_ema.alphas)
    if "uniform" in by_label:
        candidates["uniform"] = by_label["uniform"].tolist()
    if run.checkpoints.ema_ref is not None:
        candidates["run-ema"] = None
    candidates.update(posthoc or {})
    return candidates


def check_resumable(spec: SearchSpec, restart: bool = False, force: bool = False) -> SearchResult | None:
    """Check the spec and its inputs against the search's stored state (see `run_identity.prepare_state`):
    refuse a resume over a different spec or different inputs. Returns the stored result of a search that
    already finished (unless `force`, or `restart`, which clears the state first)."""
    prepare_state(spec, restart=restart)
    if not (force or restart) and artifacts.is_complete(spec.output.uri):
        from lcsc_ray.report import load_result

        log.info(
            "%s holds a finished search: its stored result follows (pass --force to run it again, "
            "--restart to start over)",
            spec.output.uri,
        )
        return load_result(spec.output.uri)
    return None


def run_search(spec: SearchSpec, restart: bool = False, force: bool = False) -> SearchResult:
    """Run (or resume) a whole LCSC search in this driver and write its results to `spec.output.uri`.

    A finished search is not redone: its stored result is returned unless `force`. `restart` clears the
    stored state (evaluations, Tune experiments, cached reference statistics) and starts over."""
    from lcsc_ray.report import write_search_outputs

    started = time.monotonic()
    spec = absolutize_output(spec)
    preflight(spec)  # read-only checks first: bad input fails before the output is touched
    # the lock comes before the state is read or cleared: a --restart never clears a running search's state
    with OutputLock(spec.output.uri, what="search") as lock, guarding(spec.output.uri, lock.check) as guard:
        finished = check_resumable(spec, restart=restart, force=force)
        if finished is not None:
            return finished
        with ray_session(spec.ray):
            checkpoint_set = load_checkpoint_set(spec.checkpoints)
            log.info(
                "loaded %d checkpoints (%s) into the object store: %.1f MB",
                len(checkpoint_set),
                ", ".join(checkpoint_set.names[:3]) + (" ..." if len(checkpoint_set) > 3 else ""),
                checkpoint_set.nbytes / 1e6,
            )
            plan = posthoc_ema.load_snapshots(spec, checkpoint_set) if spec.posthoc_ema else None
            run = SearchRun(spec, checkpoint_set, guard=guard)
            timeline = start_timeline(run)  # nodes, evaluators alive and evaluations done, against time
            try:
                run.start_pool(reference_stats_for(spec))
                grid, posthoc_seed, posthoc_baseline = run_posthoc(run, plan)
                seeds = coef.seed_vectors(len(checkpoint_set), spec, extra=posthoc_seed)
                progress = ProgressLine("lcsc search: trials", total=spec.search.budget)
                trials = run.run_rungs(run.run_trials(seeds, progress))
                require_successes(trials)
                candidates = reported_candidates(run, trials, seeds, posthoc_baseline)
                scores = score_candidates(run, candidates)
                result = build_result(spec, run, trials, scores, time.monotonic() - started)
                result.posthoc_ema = [PosthocEmaScore(**entry) for entry in grid]
                result.posthoc_snapshots = list(checkpoint_set.extra_names)
                combined, _ = combined_safetensors(spec.checkpoints, result.best.coefficients)
                timeline.stop()
                result.cluster_timeline = timeline.section()  # None on a cluster whose nodes did not change
                guard()
                write_search_outputs(spec, result, trials, combined)
            finally:
                timeline.stop()
                # every actor the search started (the pool's service and its evaluators) ends with it: on success,
                # on an error and on Ctrl-C
                if run.pool is not None:
                    run.pool.close()
    return result


def run_posthoc(run: SearchRun, plan: posthoc_ema.PosthocPlan | None) -> tuple[list[dict], list, dict]:
    """Score the post-hoc EMA grid on the search seed at the final sample count (the baseline's own search-seed
    score, so the pick is the one reported); returns (grid scores, [seed vector], {baseline label: alphas}).
    The seed is the best profile projected on the checkpoints (`posthoc_ema.checkpoint_coefficients`); it is
    left out when it does not fit `search.bound` or the checkpoints have no training steps."""
    if plan is None:
        return [], [], {}
    spec, k = run.spec, run.num_checkpoints
    grid = posthoc_ema.score_grid(run.pool, plan, k, final_samples(spec), spec.fid.seed)
    best = posthoc_ema.best_of_grid(grid)
    if best is None:
        log.warning("no post-hoc EMA of the grid scored a finite FID: no post-hoc baseline or seed")
        return grid, [], {}
    baseline = {posthoc_ema.posthoc_label(best["sigma_rel"]): plan.job_alphas(best["sigma_rel"], k)}
    alphas = posthoc_ema.seed_vector(best, run.checkpoints.steps)
    if alphas is None or np.abs(coef.from_alphas(alphas, run.parametrization)).max() > spec.search.bound:
        log.warning(
            "the best post-hoc EMA (sigma_rel %g) is no seed: the checkpoints have no increasing steps, "
            "or its coefficients exceed `search.bound`",
            best["sigma_rel"],
        )
        return grid, [], baseline
    return grid, [(posthoc_ema.seed_label(best["sigma_rel"]), alphas)], baseline


def require_successes(trials: pd.DataFrame) -> None:
    """At least one trial must have scored; else the error lists the trials' distinct reasons."""
    if (trials.status == "ok").any():
        return
    reasons = list(dict.fromkeys(str(r) for r in trials.reason if r))[:3]
    raise TrialFailedError(
        f"all {len(trials)} trials failed, none scored; reasons: {'; '.join(reasons) or 'none given'}"
    )


def score_candidates(run: SearchRun, candidates: dict) -> dict[str, dict]:
    """Every reported model at the final sample count, on the search seed and each held-out seed."""
    n = final_samples(run.spec)
    seeds = [run.spec.fid.seed, *run.spec.fid.holdout_seeds]
    labels = list(candidates)
    jobs = [(candidates[label], n, seed) for label in labels for seed in seeds]
    progress = ProgressLine(f"final scores ({n} samples)", total=len(jobs))
    fids = iter(record["fid"] for record in run.pool.score([Job.of(*job) for job in jobs], progress))
    scores = {}
    for label in labels:
        values = [next(fids) for _ in seeds]
        alphas = candidates[label]
        scores[label] = {"alphas": alphas, "fid": values[0], "holdout": values[1:], "num_samples": n}
    return scores
