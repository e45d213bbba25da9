"""From the scored candidates to the search's result: the winner, its paired comparisons, whether LCSC gained.

The winner is the best of the top-k by its search-seed FID; it is compared with every baseline over the shared
held-out seeds (`rayops.paired`: the one paired verdict); a gain is claimed only when it is no seed vector and
won against every baseline.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import pandas as pd

from lcsc_ray.checkpoints import CheckpointSet
from lcsc_ray.evaluation_store import EvaluationStore
from rayops.paired import nonfinite_scores, paired_difference
from schemas.search import CandidateScore, PairedComparison, SearchResult, SearchSpec

log = logging.getLogger(__name__)


class ScoredRun(Protocol):
    """What the result needs of a search run (`search.SearchRun`): its checkpoints and its evaluation store."""

    checkpoints: CheckpointSet
    store: EvaluationStore


def compare_with_baselines(
    winner_holdout: list[float], baselines: dict[str, list[float]]
) -> list[PairedComparison]:
    """The winner against each baseline on the shared held-out seeds: mean paired FID difference, its 95%
    interval, and a verdict that claims a win only when the interval excludes 0. A baseline whose held-out FIDs,
    or the winner's, are not all finite (a diverged or lost evaluation) is left out, with a warning that names
    it: no verdict is drawn from an inf."""
    comparisons = []
    for label, holdout in baselines.items():
        problem = nonfinite_scores(winner_holdout, holdout, names=("lcsc", label))
        if problem:
            log.warning(
                "LCSC is not compared with %s: non-finite held-out FID (%s); the result claims no gain over "
                "it (score it again to compare)",
                label,
                problem,
            )
            continue
        diff = paired_difference(winner_holdout, holdout)
        outcome = diff.verdict("lower")  # FID: lower is better
        verdict = {"win": f"LCSC beat {label}", "loss": f"{label} beat LCSC", "tie": "tie"}[outcome]
        finite = diff.num_seeds >= 2
        comparisons.append(
            PairedComparison(
                baseline=label,
                mean_difference=diff.mean,
                low=diff.low if finite else None,
                high=diff.high if finite else None,
                num_seeds=diff.num_seeds,
                verdict=verdict,
            )
        )
    return comparisons


def claims_gain(is_seed: bool, comparisons: list[PairedComparison], baseline_labels: list[str]) -> bool:
    """A gain is claimed only when the winner is no seed and beat every baseline beyond the seed-to-seed noise: each
    baseline compared (none left out for a non-finite FID) and each verdict a win."""
    compared = {c.baseline for c in comparisons}
    return (
        not is_seed
        and compared == set(baseline_labels)
        and all(c.verdict.startswith("LCSC beat") for c in comparisons)
    )


def _placement(checkpoints) -> dict[str, str]:
    """The set's placement mode and the reason it was chosen (`CheckpointSet.choice`), when known."""
    choice = getattr(checkpoints, "choice", None)
    return {"mode": choice.mode, "reason": choice.reason} if choice is not None else {}


def search_samples(trials: pd.DataFrame) -> int:
    """Samples drawn for the search's candidates, screening and promotions: each candidate's cumulative
    `samples_spent` at its last rung (a replayed evaluation counts as it was drawn)."""
    if "samples_spent" not in trials or not len(trials):  # rows made before samples were counted
        return int(trials["num_samples"].fillna(0).sum()) if "num_samples" in trials else 0
    return int(trials.groupby("trial_id").samples_spent.max().fillna(0).sum())


def build_result(
    spec: SearchSpec, run: ScoredRun, trials: pd.DataFrame, scores: dict, wall_s: float
) -> SearchResult:
    """Pick the winner among the top-k by its search-seed FID; decide whether LCSC gained anything."""
    tops = [label for label in scores if label.startswith("top")]
    winner_label = min(tops, key=lambda label: scores[label]["fid"])
    winner = scores[winner_label]
    seed_alphas = [a for a in trials[trials.phase == "seeds"].alphas]
    is_seed = any(np.allclose(winner["alphas"], a, atol=1e-9) for a in seed_alphas)
    baseline_labels = [label for label in scores if not label.startswith("top")]
    comparisons = compare_with_baselines(
        winner["holdout"], {b: scores[b]["holdout"] for b in baseline_labels}
    )
    gain = claims_gain(is_seed, comparisons, baseline_labels)

    def score(label: str, entry: dict) -> CandidateScore:
        # the run's EMA and a post-hoc EMA (a combination of snapshots, see `posthoc_ema`) are no combination of
        # the checkpoints: their coefficients are left empty
        alphas = (
            entry["alphas"]
            if entry["alphas"] is not None and len(entry["alphas"]) == len(run.checkpoints.names)
            else []
        )
        return CandidateScore(
            label=label,
            coefficients=alphas,
            fid=entry["fid"],
            num_samples=entry["num_samples"],
            holdout_fids=entry["holdout"],
        )

    return SearchResult(
        spec=spec,
        checkpoint_names=run.checkpoints.names,
        checkpoint_steps=run.checkpoints.steps,
        best=score("lcsc", winner),
        baselines=[score(label, scores[label]) for label in baseline_labels],
        gain_found=bool(gain),
        comparisons=comparisons,
        num_evaluations=int((~trials.phase.astype(str).str.startswith("rung")).sum()),  # candidates
        search_samples=search_samples(trials),
        placement=_placement(run.checkpoints),
        num_failed=int((trials.status == "failed").sum()),
        total_samples=run.store.total_samples(),
        wall_time_s=wall_s,
    )
