"""A search result with non-finite scores (a diverged baseline) is written to result.json and read back."""

from __future__ import annotations

import json
import math

from lcsc_ray.report import load_result
from rayops import artifacts
from schemas.search import CandidateScore, PairedComparison, PosthocEmaScore, SearchResult, SearchSpec


def _result(tmp_path) -> SearchResult:
    spec = SearchSpec.model_validate({"output": {"uri": str(tmp_path / "out")}})
    return SearchResult(
        spec=spec,
        checkpoint_names=["a", "b"],
        checkpoint_steps=[1, 2],
        best=CandidateScore(
            label="lcsc", coefficients=[0.5, 0.5], fid=3.0, num_samples=64, holdout_fids=[3.1]
        ),
        baselines=[
            CandidateScore(
                label="uniform",
                coefficients=[0.5, 0.5],
                fid=math.inf,
                num_samples=64,
                holdout_fids=[math.nan],
            )
        ],
        gain_found=False,
        comparisons=[
            PairedComparison(
                baseline="last", mean_difference=math.nan, low=None, high=None, num_seeds=0, verdict="tie"
            )
        ],
        posthoc_ema=[
            PosthocEmaScore(sigma_rel=0.1, gamma=6.9, step=2, fid=-math.inf, snapshot_coefficients=[1.0])
        ],
        num_evaluations=2,
        wall_time_s=1.0,
    )


def test_nonfinite_scores_round_trip_through_result_json(tmp_path):
    """inf, -inf and NaN scores are written as the strings "Infinity", "-Infinity", "NaN" and load back as floats."""
    result = _result(tmp_path)
    out = str(tmp_path / "out")
    artifacts.write_artifact(out, {"result.json": result.model_dump_json(indent=2).encode()}, metadata={})
    raw = json.loads((tmp_path / "out" / "result.json").read_text())
    assert raw["baselines"][0]["fid"] == "Infinity" and raw["baselines"][0]["holdout_fids"] == ["NaN"]
    assert raw["posthoc_ema"][0]["fid"] == "-Infinity" and raw["comparisons"][0]["mean_difference"] == "NaN"
    assert raw["best"]["fid"] == 3.0  # a finite score stays a number
    loaded = load_result(out)
    assert loaded.baselines[0].fid == math.inf and math.isnan(loaded.baselines[0].holdout_fids[0])
    assert loaded.posthoc_ema[0].fid == -math.inf and math.isnan(loaded.comparisons[0].mean_difference)
    assert loaded.best == result.best
