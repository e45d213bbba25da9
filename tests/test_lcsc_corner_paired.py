"""An inf FID (a diverged or lost evaluation) never reaches a paired comparison: refused by name or left out."""

from __future__ import annotations

import math

import pytest

from lcsc_ray.search_result import claims_gain, compare_with_baselines
from rayops.paired import NonFiniteScoreError, paired_difference

INF = math.inf


@pytest.mark.parametrize(
    ("a", "b", "named"),
    [
        ([1.0, INF, 3.0], [2.0, 3.0, 4.0], r"a\[1\] = inf"),
        ([INF, 1.0], [1.0, INF], r"a\[0\] = inf, b\[1\] = inf"),  # fsum's "-inf + inf" crash before
        ([1.0, 2.0], [math.nan, 2.0], r"b\[0\] = nan"),
    ],
)
def test_paired_difference_refuses_non_finite_scores_by_name(a, b, named):
    """Non-finite scores are refused with an error naming each one's side and seed index, never averaged."""
    with pytest.raises(NonFiniteScoreError, match=named):
        paired_difference(a, b)


def test_a_baseline_with_an_inf_is_left_out_and_blocks_the_gain_claim():
    """A baseline lost on one held-out seed gets no comparison (no tie, no win); the others are compared as before,
    and no gain is claimed while a baseline went uncompared."""
    winner = [50.0, 52.0, 51.0]
    comparisons = compare_with_baselines(winner, {"uniform": [INF, 60.0, 61.0], "last": [60.0, 63.0, 61.5]})
    assert [c.baseline for c in comparisons] == ["last"]
    assert comparisons[0].verdict == "LCSC beat last" and comparisons[0].mean_difference == pytest.approx(
        -10.5
    )
    assert not claims_gain(False, comparisons, ["uniform", "last"])
    assert claims_gain(False, comparisons, ["last"])


def test_an_inf_on_the_winners_side_leaves_every_baseline_uncompared():
    """A winner with a lost held-out score is compared with nothing, so no verdict and no gain come from it."""
    comparisons = compare_with_baselines([50.0, INF], {"last": [60.0, 61.0], "uniform": [INF, 70.0]})
    assert comparisons == [] and not claims_gain(False, comparisons, ["last", "uniform"])
