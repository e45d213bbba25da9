"""Ray Tune plumbing of the search: search space, Nevergrad optimiser, resumable phases, progress."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable

import nevergrad as ng
import numpy as np
import pandas as pd
from ray import tune
from ray.tune import Callback
from ray.tune.error import TuneError
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from lcsc_ray.output_guard import Guard, OutputGuard
from rayops import storage
from rayops.output_lock import OutputLockedError
from rayops.progress import ProgressLine
from schemas.search import SearchSpec

log = logging.getLogger(__name__)
METRIC, MODE = "fid", "min"
# A trial whose process dies (killed, OOM) is run again once: its evaluation goes on in the pool, so the retry
# joins it or reads its stored result. A deterministic error fails the retry at once (the pool remembers it).
TRIAL_RETRIES = 1
# A proposal whose trial errored is proposed again once, in a new trial: Tune's own retry does not cover a trial
# whose process died with two of its tasks in flight (Tune counts the one death twice and gives up on the trial).
PROPOSAL_ATTEMPTS = 2
# Tune's own console tables would interleave with our progress line; its CSV and JSON logs are kept.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
_unguarded = OutputGuard()  # the guard of a caller without an output lock (tests, benchmarks): never raises


def free_names(dimension: int) -> list[str]:
    """Names of the free coefficients in Tune configs: x000, x001, ..."""
    return [f"x{i:03d}" for i in range(dimension)]


def search_space(names: list[str], bound: float, labels: list[str] | None = None) -> dict:
    """Tune's space over the free values, plus the candidate's label: one of `labels` (the seeds' own), or
    "search" for the optimiser's proposals."""
    label = tune.choice(labels) if labels else "search"
    return {**{name: tune.uniform(-bound, bound) for name in names}, "label": label}


def build_optimizer(
    spec: SearchSpec, start: np.ndarray, budget: int, num_workers: int
) -> ng.optimizers.base.Optimizer:
    """The spec's Nevergrad optimiser over [-bound, bound]^d, started at `start` with step size `sigma`."""
    bound = spec.search.bound
    init = np.clip(np.asarray(start, dtype=np.float64), -bound, bound)
    parametrization = ng.p.Array(init=init, lower=-bound, upper=bound).set_mutation(sigma=spec.search.sigma)
    parametrization.random_state = np.random.RandomState(spec.seed)
    optimizer_class = ng.optimizers.registry[spec.search.optimizer]
    return optimizer_class(parametrization=parametrization, budget=max(budget, 1), num_workers=num_workers)


def rung_scheduler(schedule: list[int], eta: int) -> AsyncHyperBandScheduler:
    """ASHA over a candidate's cumulative sample count (`samples`): after each count of `schedule` (which grows
    by `eta`), a trial goes on only when its score is in the best 1/eta of those recorded at that count so far;
    it never waits for a rung to fill. The score (`fid`) a stopped trial last reported is what the searcher is
    told, so it should be comparable across counts (`search.fidelity_score: extrapolated`)."""
    scheduler = AsyncHyperBandScheduler(
        time_attr="samples",
        max_t=schedule[-1],
        grace_period=schedule[0],
        reduction_factor=eta,
        brackets=1,
    )
    milestones = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)
    if milestones != list(schedule[:-1]) + ([schedule[-1]] if milestones[-1:] == [schedule[-1]] else []):
        raise ValueError(f"ASHA's rungs {milestones} do not match the fidelity schedule {schedule}")
    return scheduler


def seed_searcher(points: list[dict], max_concurrent: int) -> BasicVariantGenerator:
    """Evaluates exactly the given points (the search's seed vectors), `max_concurrent` at a time: one trial
    per evaluator, so Tune reuses that many trial actors instead of starting a process for every seed."""
    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent)


class ProposalRecord:
    """The optimiser phase's proposals, in order, one small JSON file each (written atomically) under `uri`:
    {index, free, trial_id, done, value}. None keeps them in memory only. `guard` is called before each write
    (a search whose output lock was lost stops there instead of writing)."""

    def __init__(self, uri: str | None, guard: Guard = _unguarded):
        self.uri, self.guard = uri, guard

    def load(self) -> list[dict]:
        """Every recorded proposal, by index."""
        if self.uri is None:
            return []
        entries = [json.loads(storage.read_bytes(u)) for u in storage.list_uris(self.uri, "*.json")]
        return sorted(entries, key=lambda entry: entry["index"])

    def write(self, entry: dict) -> None:
        """Record (or update) one proposal."""
        self.guard()
        if self.uri is not None:
            storage.write_bytes(
                storage.join(self.uri, f"{entry['index']:06d}.json"), json.dumps(entry).encode()
            )


class ReplaySearcher(Searcher):
    """Nevergrad ask/tell in one fixed order, so that a search resumed from its record is exact.

    With W workers the optimiser sees A0 .. A(W-1), then T0, AW, T1, A(W+1), ...: proposal k is asked only once
    the results of proposals 0 .. k-W were told, and result j is told (in proposal order) only once proposals
    0 .. j+W-1 were asked. Which trial finishes first therefore never changes what the optimiser sees. Each
    proposal is recorded before Tune evaluates it, and its result when the trial ends. On resume the optimiser
    (rebuilt with the same seed and start) replays the same asks and tells from the record; every recorded
    proposal is handed to Tune again (finished ones are replayed from the evaluation store, not recomputed),
    then the search continues with new proposals. A proposal whose trial errored is handed to a new trial once more
    (`PROPOSAL_ATTEMPTS`), in the same run or after a resume; its result is told only when that attempt ends, so a
    lost trial process changes nothing the optimiser sees."""

    def __init__(
        self,
        optimizer,
        names: list[str],
        num_workers: int,
        record_uri: str | None = None,
        guard: Guard = _unguarded,
        in_flight_limit: Callable[[], int] | None = None,
    ):
        super().__init__(metric=METRIC, mode=MODE)
        self.optimizer, self.names, self.workers = optimizer, names, max(1, num_workers)
        # how many trials may run now (the live evaluator pool); the ask/tell order stays that of `workers`
        self.in_flight_limit = in_flight_limit or (lambda: self.workers)
        self.budget = int(optimizer.budget)
        self.record = ProposalRecord(record_uri, guard)
        self.entries: list[dict] = []
        self.candidates: list = []
        self.told = 0
        self.by_trial: dict[str, int] = {}
        self.reissue: deque[int] = deque()
        # Proposals asked but not yet handed to Tune (fewer trials may run than `workers` while the evaluator pool
        # is small). Asking does not wait for room: the fixed order needs `workers` asks ahead of each tell, and a
        # searcher that asked only when a trial could start would stay at its smallest concurrency for good.
        self.asked: deque[int] = deque()
        self._replay(self.record.load())

    def _may_ask(self) -> bool:
        k = len(self.entries)
        return k < self.budget and (k < self.workers or self.told == k - self.workers + 1)

    def _may_tell(self) -> bool:
        j = self.told
        return (
            j < len(self.entries)
            and self.entries[j]["done"]
            and len(self.entries) >= min(j + self.workers, self.budget)
        )

    def _ask(self) -> list[float]:
        candidate = self.optimizer.ask()
        self.candidates.append(candidate)
        return [float(x) for x in np.asarray(candidate.value).ravel()]

    def _tell_ready(self) -> None:
        while self._may_tell():
            value = self.entries[self.told]["value"]
            if value is not None:  # a failed trial teaches the optimiser nothing (as Ray's NevergradSearch)
                # the one sign convention: FID is minimised (mode "min") and Nevergrad minimises, so it is told as is
                self.optimizer.tell(self.candidates[self.told], float(value))
            self.told += 1

    def _replay(self, recorded: list[dict]) -> None:
        for entry in recorded:
            if entry["done"] and entry["value"] is None and entry.get("attempts", 1) < PROPOSAL_ATTEMPTS:
                # its trial errored: attempted once more, told once that attempt ends
                entry = {**entry, "done": False, "attempts": entry.get("attempts", 1) + 1}
            self._tell_ready()
            if entry["index"] != len(self.entries) or not self._may_ask():
                raise RuntimeError(
                    f"the proposal record {self.record.uri} is out of order at {entry['index']}; "
                    "start over with `--restart`"
                )
            free = self._ask()
            if not np.allclose(free, entry["free"], rtol=0, atol=1e-12):
                raise RuntimeError(
                    f"the optimiser did not propose recorded proposal {entry['index']} again "
                    f"({self.record.uri}): it is not deterministic; start over with `--restart`"
                )
            self.entries.append(entry)
            self.reissue.append(entry["index"])
        self._tell_ready()
        if recorded:
            log.info(
                "replayed %d recorded proposals (%d finished) into the optimiser",
                len(recorded),
                sum(entry["done"] for entry in recorded),
            )

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """The space is the optimiser's own; Tune's config holds only constants (the label)."""
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        """A recorded proposal to re-issue, else a new one when the fixed order allows, else None (wait). At most
        `in_flight_limit()` trials run at once (never more than `workers`)."""
        # asked as soon as the fixed order allows (and told what that frees), whether or not a trial may start now:
        # handed to Tune in order, as room allows
        while self._may_ask():
            self.asked.append(len(self.entries))
            self.entries.append(
                {"index": len(self.entries), "free": self._ask(), "done": False, "value": None}
            )
            self._tell_ready()
        if len(self.by_trial) >= min(self.workers, self.in_flight_limit()):
            return None
        if self.reissue:
            index = self.reissue.popleft()
        elif self.asked:
            index = self.asked.popleft()
        elif len(self.entries) >= self.budget:
            # finished once every proposal is done: one still running may error and be proposed again
            return Searcher.FINISHED if all(entry["done"] for entry in self.entries) else None
        else:
            return None
        entry = self.entries[index]
        entry["trial_id"] = trial_id
        self.record.write(entry)  # recorded before Tune starts the trial
        self.by_trial[trial_id] = index
        return dict(zip(self.names, entry["free"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Record the trial's FID (None when it failed), then tell whatever the fixed order allows."""
        index = self.by_trial.pop(trial_id, None)
        if index is None:
            return
        entry = self.entries[index]
        if not entry["done"]:
            ok = result is not None and not error and METRIC in result
            attempts = entry.get("attempts", 1)
            if not ok and attempts < PROPOSAL_ATTEMPTS:
                entry["attempts"] = (
                    attempts + 1
                )  # proposed again in a new trial; a deterministic failure fails
                self.reissue.appendleft(index)  # again at once (the evaluation store remembers it)
            else:
                entry.update(done=True, value=float(result[METRIC]) if ok else None)
            self.record.write(entry)
        self._tell_ready()

    def save(self, checkpoint_path: str) -> None:
        """Tune's snapshot holds only where the record is: the record itself is the state."""
        with open(checkpoint_path, "w") as handle:
            json.dump({"record": self.record.uri}, handle)

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a resumed search builds a new searcher that replays the record."""

    def in_proposal_order(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The phase's trial rows in proposal order (Tune lists a trial it ran again, after its process died,
        out of turn), so the trials table does not depend on which process was lost."""
        index = {entry.get("trial_id"): entry["index"] for entry in self.entries}
        order = rows.trial_id.map(
            lambda trial_id: index.get(str(trial_id).removeprefix("trial_"), len(index))
        )
        # a trial whose proposal was attempted again in a later trial is superseded by it: not a row of its own
        current = order < len(index)
        if current.sum() == len(self.entries):
            rows, order = rows[current], order[current]
        return rows.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def nevergrad_searcher(
    optimizer,
    names: list[str],
    max_concurrent: int,
    record_uri: str | None = None,
    guard: Guard = _unguarded,
    in_flight_limit: Callable[[], int] | None = None,
) -> ReplaySearcher:
    """The optimiser phase's searcher: Nevergrad's ask/tell in a fixed order, every proposal recorded under
    `record_uri` before it is evaluated, and replayed from there when the search resumes (see ReplaySearcher).
    `in_flight_limit`: how many trials may run now (the live pool size; default `max_concurrent`)."""
    return ReplaySearcher(optimizer, names, max_concurrent, record_uri, guard, in_flight_limit)


class SearchProgress(Callback):
    """Prints trials done out of the budget, the best FID so far and an ETA; and calls `guard` at each Tune step
    (before Tune writes its experiment state) and each result or error it is told. A guard that raises (a lost
    output lock) ends `tuner.fit()` with its error: Tune cleans up without a last snapshot, and the phase resumes
    from its last one (finished evaluations replay from the evaluation store)."""

    def __init__(
        self, progress: ProgressLine, offset: int = 0, best: float = float("inf"), guard: Guard = _unguarded
    ):
        self.progress, self.offset, self.best, self.guard = progress, offset, best, guard
        self.done = 0

    def on_step_begin(self, iteration, trials, **info):
        """Each step of Tune's loop; its experiment state is written later in the same step."""
        self.guard()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """One trial reported its FID (a candidate counts once, at its first rung)."""
        self.guard()
        self.done += int(result.get("rung", 0) == 0)
        if result.get("status") == "ok":
            self.best = min(self.best, float(result[METRIC]))
        self.progress.update(done=self.offset + self.done, best_fid=self.best, last_fid=float(result[METRIC]))

    def on_trial_error(self, iteration, trials, trial, **info):
        """A trial failed after its retry."""
        self.guard()
        self.done += 1
        self.progress.emit(f"trial {trial.trial_id} failed: {trial.error_file or 'see Tune logs'}")
        self.progress.update(done=self.offset + self.done, force=True)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # the default embeds every coefficient and overflows name limits


def run_phase(
    name: str,
    storage_path: str,
    trainable,
    searcher,
    space: dict,
    num_samples: int,
    callbacks: list[Callback],
    scheduler: TrialScheduler | None = None,
) -> pd.DataFrame:
    """Run (or resume) one Tune experiment; return one row per trial, errored trials included. `scheduler`
    (ASHA over the samples drawn, `rung_scheduler`) stops trials between the rungs of their schedule."""
    path = f"{storage_path.rstrip('/')}/{name}"
    # A searcher with its own space (Nevergrad) takes only the constant label from Tune's param_space.
    tuner_space = space if isinstance(searcher, BasicVariantGenerator) else {"label": "search"}
    if isinstance(searcher, ReplaySearcher):
        # The optimiser phase resumes from its own proposal record, never from Tune's searcher snapshot (taken
        # every ~10 s, it forgets later proposals): a fresh experiment re-issues every recorded proposal.
        storage.delete(path, recursive=True)
    if tune.Tuner.can_restore(path):
        log.info("resuming Tune experiment %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(
            path,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            param_space=tuner_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tuner_space,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=num_samples,
                metric=METRIC,
                mode=MODE,
                reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                storage_path=storage_path,
                name=name,
                verbose=0,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
            ),
        )
    try:
        grid = tuner.fit()
    except TuneError as exc:
        lost = _guard_error(exc)
        if lost is None:
            raise
        raise lost from None
    check_finished(grid, name)
    rows = _grid_rows(grid, name)
    if isinstance(searcher, BasicVariantGenerator) and len(rows):
        # the seeds in the order given (a restored experiment lists its trials in another order)
        order = {label: i for i, label in enumerate(space["label"].categories)}
        rows = rows.sort_values("label", key=lambda labels: labels.map(order), kind="stable").reset_index(
            drop=True
        )
    if isinstance(searcher, ReplaySearcher) and len(rows):
        rows = searcher.in_proposal_order(rows)
    return rows


def _guard_error(exc: BaseException) -> OutputLockedError | None:
    """The guard's own error behind a TuneError: Tune wraps an error raised by a callback as the text of its
    traceback, raised while handling the original (kept as its `__context__`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OutputLockedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) reached the search while Tune ran: Tune saved its state and returned early."""


def check_finished(grid, phase: str) -> None:
    """Raise `SearchInterrupted` when some trial of `grid` neither finished nor failed: Tune catches the first
    Ctrl-C, saves its state and returns normally, and a search must not go on to its next phase with a partial
    grid. Rerunning the same command resumes (finished evaluations are kept)."""
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished > 0:
        raise SearchInterrupted(
            f"the search was interrupted during its {phase} phase ({unfinished} trial(s) "
            "unfinished); rerun the same command to resume"
        )


def error_summary(error: BaseException, limit: int = 500) -> str:
    """One line naming a failed trial's root cause (a Ray task error's cause, not its traceback)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:limit]


def _trial_id(result) -> str:
    """The trial a result belongs to, from its folder (`trial_<id>`, see `_trial_dirname`). Not from its metrics:
    a trial that errored before reporting can carry another trial's `trial_id` there (Tune reuses actors), and
    would then pass for that trial's row instead of a superseded attempt."""
    folder = str(getattr(result, "path", "") or "").rstrip("/").rsplit("/", 1)[-1]
    if folder.startswith("trial_"):
        return folder.removeprefix("trial_")
    return str((result.metrics or {}).get("trial_id") or folder)


def _grid_rows(grid, phase: str) -> pd.DataFrame:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        row = {
            "trial_id": _trial_id(result),
            "phase": phase,
            "label": metrics.get("label", config.get("label", "search")),
            "fid": metrics.get(METRIC, float("nan")),
            "fid_raw": metrics.get("fid_raw", metrics.get(METRIC, float("nan"))),
            "fid_inf": metrics.get("fid_inf", float("nan")),
            "rung": metrics.get("rung", 0),
            "rung_samples": metrics.get("rung_samples"),
            "rung_fids": metrics.get("rung_fids"),
            "rung_fids_inf": metrics.get("rung_fids_inf"),
            "samples_spent": metrics.get("samples_spent", 0),
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
