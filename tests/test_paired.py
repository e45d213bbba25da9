"""The paired-difference interval against scipy's paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rayops.paired import paired_difference


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_interval_matches_scipy_paired_t_test(n):
    """Mean and 95% bounds equal scipy.stats.ttest_rel's confidence interval (float64)."""
    rng = np.random.default_rng(n)
    base = rng.normal(70, 6, n)  # seed-to-seed spread shared by both models
    a, b = base + rng.normal(-1.5, 0.5, n), base + rng.normal(0, 0.5, n)
    diff = paired_difference(a.tolist(), b.tolist())
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert diff.mean == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert diff.low == pytest.approx(expected.low, rel=1e-10)
    assert diff.high == pytest.approx(expected.high, rel=1e-10)
    assert diff.num_seeds == n


def test_pairing_detects_a_gap_that_unpaired_spreads_hide():
    """A consistent 1.0 gap under sd-6 seed noise is a real difference; a noisy one is not."""
    base = [64.0, 71.0, 77.0]
    assert paired_difference([x - 1.0 for x in base], base).excludes_zero
    noisy = paired_difference([base[0] - 3, base[1] + 2, base[2] - 1], base)
    assert noisy.low < 0 < noisy.high and not noisy.excludes_zero


def test_too_few_seeds_give_no_interval():
    """One seed gives a mean but no interval (never a claimed win); mismatched lengths are refused."""
    one = paired_difference([1.0], [3.0])
    assert one.mean == -2.0 and math.isnan(one.low) and not one.excludes_zero
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])


def _result_with(winner_holdout: list[float], ema_holdout: list[float]):
    """build_result over a winner that is no seed vector and one baseline, with the given held-out FIDs."""
    from types import SimpleNamespace

    import pandas as pd

    from lcsc_ray.search_result import build_result
    from schemas.search import SearchSpec

    spec = SearchSpec.model_validate({"fid": {"holdout_seeds": [1, 2, 3]}})
    run = SimpleNamespace(
        checkpoints=SimpleNamespace(names=["a", "b"], steps=[1, 2]),
        store=SimpleNamespace(total_samples=lambda: 0),
    )
    trials = pd.DataFrame(
        {
            "phase": ["seeds", "search"],
            "alphas": [[0.0, 1.0], [0.3, 0.7]],
            "rung": [0, 0],
            "status": ["ok", "ok"],
        }
    )
    scores = {
        "top1": {"alphas": [0.3, 0.7], "fid": 68.0, "holdout": winner_holdout, "num_samples": 500},
        "ema@0.9": {"alphas": [0.1, 0.9], "fid": 70.0, "holdout": ema_holdout, "num_samples": 500},
    }
    return build_result(spec, run, trials, scores, 1.0)


def test_verdict_is_a_tie_when_the_paired_interval_includes_zero():
    """68.6-like vs 70.6-like means with inconsistent per-seed gaps: a tie, no gain claimed, table says so."""
    from lcsc_ray.report import format_table

    result = _result_with([65.6, 70.0, 70.2], [69.0, 72.5, 70.3])
    (comparison,) = result.comparisons
    expected = stats.ttest_rel([65.6, 70.0, 70.2], [69.0, 72.5, 70.3]).confidence_interval(0.95)
    assert comparison.verdict == "tie" and comparison.low == pytest.approx(expected.low)
    assert comparison.mean_difference == pytest.approx(-2.0)
    assert result.gain_found is False
    table = format_table(result)
    assert "tie" in table and "no gain found" in table and "LCSC beat every" not in table


def test_verdict_claims_a_win_only_when_the_interval_excludes_zero():
    """A consistent per-seed gain is 'LCSC beat X' and gain_found; a consistent loss is 'X beat LCSC'."""
    win = _result_with([67.0, 70.1, 73.9], [69.0, 72.0, 76.0])
    assert win.comparisons[0].verdict == "LCSC beat ema@0.9" and win.comparisons[0].high < 0
    assert win.gain_found is True
    loss = _result_with([69.0, 72.0, 76.0], [67.0, 70.1, 73.9])
    assert loss.comparisons[0].verdict == "ema@0.9 beat LCSC" and not loss.gain_found


def test_verdict_reads_the_side_of_the_interval_for_lower_or_higher_is_better():
    """An interval wholly below 0 is a win when lower is better and a loss when higher is; above 0 the reverse."""
    below = paired_difference([1.0, 2.0, 3.0], [2.0, 3.1, 3.9])  # differences -1.0, -1.1, -0.9
    above = paired_difference([2.0, 3.1, 3.9], [1.0, 2.0, 3.0])
    assert below.high < 0 and above.low > 0
    assert (below.verdict("lower"), below.verdict("higher")) == ("win", "loss")
    assert (above.verdict("lower"), above.verdict("higher")) == ("loss", "win")


def test_verdict_is_a_tie_when_the_interval_touches_or_spans_the_reference():
    """An interval that ends exactly at the reference, or spans it, or is missing (one seed) is a tie."""
    from rayops.paired import PairedDifference

    assert PairedDifference(-1.0, -2.0, 0.0, 3).verdict("lower") == "tie"
    assert PairedDifference(1.0, 0.0, 2.0, 3).verdict("higher") == "tie"
    assert paired_difference([1.0, 3.0, 2.0], [2.0, 2.0, 2.0]).verdict("lower") == "tie"
    assert paired_difference([1.0], [3.0]).verdict("lower") == "tie"
    # a ratio against 1 (a speed-up: higher is better)
    assert PairedDifference(1.5, 1.2, 1.8, 4).verdict("higher", reference=1.0) == "win"
    assert PairedDifference(1.5, 1.2, 1.8, 4).verdict("higher", reference=1.2) == "tie"


def test_verdict_refuses_a_nan_interval_and_an_unknown_side():
    """A NaN bound over two or more seeds (not from `paired_difference`) is refused, not read as a tie."""
    from rayops.paired import NonFiniteScoreError, PairedDifference

    with pytest.raises(NonFiniteScoreError, match="finite interval"):
        PairedDifference(-1.0, math.nan, -0.5, 3).verdict("lower")
    with pytest.raises(NonFiniteScoreError):
        paired_difference([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="'lower' or 'higher'"):
        PairedDifference(-1.0, -2.0, -0.5, 3).verdict("smaller")


def test_seeds_to_resolve_recovers_the_spread_and_grows_with_it():
    from rayops.paired import seeds_to_resolve

    diff = paired_difference([1.0, 3.0, 2.0, 6.0], [0.0, 0.0, 0.0, 0.0])  # differences with sd 2.16
    need = seeds_to_resolve(diff, margin=1.0)
    # the smallest n whose interval at that sd is narrower than ±1 (t ~ 2.07 at n ~ 21)
    assert need is not None and 19 <= need <= 22
    assert seeds_to_resolve(diff, margin=0.5) > need  # a finer margin needs more seeds
    assert seeds_to_resolve(diff, margin=100.0) == diff.num_seeds  # already resolved at this margin
    assert seeds_to_resolve(paired_difference([1.0], [0.0]), margin=1.0) is None  # no interval
