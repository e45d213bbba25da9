"""Asynchronous rungs: ASHA promotes inside the trials, a stopped candidate draws nothing more, and the trials
table records each candidate's rung scores (raw and extrapolated) and the samples spent on it."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from pydantic import ValidationError

from lcsc_ray.evaluation_store import evaluation_key
from lcsc_ray.search import run_search
from schemas.search import SearchSpec
from tests.test_lcsc_search import tiny_spec


def asha_spec(tmp_path, **search) -> SearchSpec:
    """The tiny search with batches of 8, rungs at 32 and 128 samples, eta 4, FID_inf as the score."""
    spec = tiny_spec(tmp_path, budget=12, fidelity_schedule=[32, 128], eta=4, rescore_top_k=1, **search)
    spec = spec.model_dump()
    spec["evaluators"]["batch_size"] = 8
    spec["search"]["fidelity_score"] = "extrapolated"
    return SearchSpec.model_validate(spec)


def test_spec_refuses_a_schedule_that_does_not_grow_by_eta_and_too_few_batches_to_extrapolate():
    """Both errors name the fields to change."""
    with pytest.raises(ValidationError, match=r"fidelity_schedule.*grow by the factor `search.eta` \(4\)"):
        SearchSpec.model_validate({"search": {"fidelity_schedule": [100, 200], "eta": 4}})
    with pytest.raises(ValidationError, match="`search.eta` needs `search.fidelity_schedule`"):
        SearchSpec.model_validate({"search": {"eta": 3}})
    with pytest.raises(ValidationError, match="evaluators.batch_size"):
        SearchSpec.model_validate({"fid": {"num_samples": 250}, "search": {"fidelity_score": "extrapolated"}})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_search_promotes_some_and_stopped_candidates_draw_no_more(tmp_path, ray_local):
    """Some candidates reach 128 samples, not all; one stopped at 32 never has a 128-sample evaluation; each
    row's score is its last rung's FID_inf, and the samples spent on it are its last rung's count (a promotion
    continues the 32 samples drawn, it does not start over)."""
    spec = asha_spec(tmp_path)
    result = run_search(spec)
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    ok = trials[trials.status == "ok"]
    assert len(ok) == 12 and 1 <= (ok.rung == 1).sum() < 12
    for row in ok.itertuples():
        assert list(row.rung_samples) == [32, 128][: row.rung + 1]
        assert len(row.rung_fids) == len(row.rung_fids_inf) == row.rung + 1
        assert row.fid == pytest.approx(row.rung_fids_inf[-1]) and math.isfinite(row.fid)
        assert row.fid_raw == pytest.approx(row.rung_fids[-1])
        assert row.samples_spent == row.rung_samples[-1]
    records = tmp_path / "out" / "state" / "evaluations"
    stopped = ok[(ok.rung == 0) & (ok.phase == "search")]
    assert len(stopped)
    for row in stopped.itertuples():
        assert not (records / f"{evaluation_key(row.coefficients, 128, spec.fid.seed)}.json").exists()
    promoted = ok[ok.rung == 1].iloc[0]
    stored = json.loads(
        (records / f"{evaluation_key(promoted.coefficients, 128, spec.fid.seed)}.json").read_text()
    )
    assert stored["samples_drawn"] == 96
    assert result.best.num_samples == 128
    # the result's sample count is what was drawn: a continued promotion counts its increment, not its size
    drawn = [json.loads(path.read_text()) for path in records.glob("*.json")]
    assert result.total_samples == sum(record["samples_drawn"] for record in drawn)
    assert result.total_samples < sum(record["num_samples"] for record in drawn)
