"""Table 2 carried to the paper's sizes (benchmarks/table2_extrapolate.py) and the width study's sizing
(benchmarks/recovery_width.py): the fit, the expected-time model and the steps per width on hand-made inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from recovery_width import TOKENS_PER_STEP, parameters, parse_plan, run_steps, steps_for
from recovery_width_report import learning_point
from table2_scaling import (
    AffineFit,
    LinkHop,
    SizeCosts,
    affine_fit,
    failure_probability,
    plus_extra_seconds,
    seconds_per_useful_step,
    slowdown_fit,
    speedup,
)


def test_affine_fit_recovers_a_line_and_its_interval_covers_it():
    """Noisy repeats around t = 0.002 + 3e-9 x bytes: the fit lands near both and its interval holds them."""
    sizes = [1e5, 1e6, 4e6, 1.6e7]
    noise = [-2e-4, 1e-4, 0.0, 2e-4, -1e-4]
    samples = [[0.002 + 3e-9 * s + n for n in noise] for s in sizes]
    fit = affine_fit(sizes, samples)
    assert fit.intercept == pytest.approx(0.002, abs=1e-4)
    assert fit.slope == pytest.approx(3e-9, rel=0.02)
    assert fit.intercept_ci[0] <= 0.002 <= fit.intercept_ci[1]
    assert fit.slope_ci[0] <= 3e-9 <= fit.slope_ci[1]
    assert fit(1e6, "low") <= fit(1e6) <= fit(1e6, "high")


def test_affine_fit_refuses_a_single_size():
    with pytest.raises(ValueError, match="at least two sizes"):
        affine_fit([1.0], [[1.0, 2.0]])


def test_failure_probability_is_the_papers_hourly_conversion():
    """5% per hour at 91.5 s per step: 1 - 0.95^(91.5/3600), the paper's 0.0013 per stage per step."""
    assert failure_probability(0.05, 91.5) == pytest.approx(1 - 0.95 ** (91.5 / 3600))
    assert failure_probability(0.0, 91.5) == 0.0
    with pytest.raises(ValueError, match="hourly rate"):
        failure_probability(1.0, 91.5)


def _costs(**changes) -> SizeCosts:
    base = {
        "step_s": 100.0,
        "plus_extra_s": 0.0,
        "save_s": 0.0,
        "stages": 6,
        "checkpoint_every": 100,
        "recovery_s": 30.0,
    }
    return SizeCosts(**{**base, **changes})


def test_without_failures_or_overheads_every_strategy_ties_checkpointing():
    costs = _costs()
    for strategy in ("checkfree", "checkfree+"):
        assert speedup(strategy, costs, 0.0) == pytest.approx(1.0)


def test_checkpointing_pays_half_an_interval_per_failure_and_checkfree_plus_only_the_recovery():
    """f failures per step: checkpointing B + f (K/2 B + R), CheckFree+ B + f R (g = 1, e = 0)."""
    costs = _costs()
    f = 0.01
    assert seconds_per_useful_step("checkpoint", costs, f) == pytest.approx(100 + 0.01 * (50 * 100 + 30))
    assert seconds_per_useful_step("checkfree+", costs, f) == pytest.approx(100 + 0.01 * 30)
    # CheckFree rolls back for the outer 2 of 6 stages and pays saves like checkpointing
    cf = seconds_per_useful_step("checkfree", _costs(save_s=600.0), f)
    assert cf == pytest.approx(100 + 0.01 * (4 / 6 * 30 + 2 / 6 * (50 * 100 + 30)) + 6.0)


def test_checkfree_plus_slowdown_and_swap_cost_reduce_its_speedup():
    """A per-step overhead, a convergence slowdown g and extra steps per rebuild e each lower the speed-up."""
    costs = _costs()
    base = speedup("checkfree+", costs, 0.10)
    assert base > 1
    assert speedup("checkfree+", _costs(plus_extra_s=10.0), 0.10) < base
    assert speedup("checkfree+", costs, 0.10, g=1.1) == pytest.approx(base / 1.1)
    assert speedup("checkfree+", costs, 0.10, e=20.0) < base
    with pytest.raises(ValueError, match="unknown strategy"):
        speedup("bamboo", costs, 0.10)


def test_swap_cost_counts_four_extra_hops_per_swapped_micro_batch_and_two_copies():
    """8 micro-batches: 4 swapped x 4 extra hops of the activation, plus embedding and head copies."""
    hop = AffineFit(0.001, 1e-9, (0.001, 0.001), (1e-9, 1e-9))
    extra = plus_extra_seconds(hop, 8, 1e6, 5e6, 1, "mean")
    assert extra == pytest.approx(16 * (0.001 + 1e-3) + 2 * (0.001 + 5e-3))
    assert plus_extra_seconds(hop, 8, 1e6, 5e6, 2, "mean") < extra
    link = LinkHop(hop, bandwidth=1e8)
    assert link(1e8) == pytest.approx(0.001 + 1.0)


def test_slowdown_fit_recovers_a_known_slowdown_and_damage_per_rebuild():
    """steps = g N0 + e rebuilds exactly: the least squares returns g and e."""
    reference = [{"seed": s, "reached": True, "steps_to_target": n} for s, n in enumerate([60, 80, 100, 70])]
    g, e = 1.05, 3.0
    runs = {
        "reference": reference,
        "runs": {
            rate: [
                {
                    "strategy": "checkfree+",
                    "seed": r["seed"],
                    "reached": True,
                    "recoveries": k + r["seed"] % 2,
                    "steps_to_target": g * r["steps_to_target"] + e * (k + r["seed"] % 2),
                }
                for r in reference
            ]
            for rate, k in (("5%", 0), ("10%", 2), ("16%", 4))
        },
    }
    fit = slowdown_fit(runs, "checkfree+", boot=50)
    assert fit["g"] == pytest.approx(g)
    assert fit["e"] == pytest.approx(e)
    with pytest.raises(ValueError, match="need 3"):
        slowdown_fit(runs, "redundant", boot=10)


def test_every_width_gets_the_same_tokens_per_parameter():
    """steps_for gives k tokens per parameter at every width (to the nearest 10 steps), within the run's steps."""
    for d in (32, 64, 128, 256):
        steps = steps_for(d, 2.19)
        assert steps % 10 == 0
        assert abs(steps * TOKENS_PER_STEP / parameters(d) - 2.19) <= 5 * TOKENS_PER_STEP / parameters(d)
        assert steps <= run_steps(d)
    assert parameters(128) > 3 * parameters(64)


def test_plan_entries_name_width_and_tokens_per_parameter():
    assert parse_plan(["64:2", "128:5.5"]) == [(64, 2.0), (128, 5.5)]
    with pytest.raises(SystemExit, match="d:k"):
        parse_plan(["64"])
    with pytest.raises(SystemExit, match="d:k"):
        parse_plan(["64:100"])


def test_learning_point_reads_the_fall_per_100_steps():
    res = {"plateau": {"val_steps": [100, 200, 300], "val_losses": [2.0, 1.8, 1.782]}}
    point = learning_point(res)
    assert point["step"] == 300
    assert point["fall_per_100_steps"] == pytest.approx(0.01)
