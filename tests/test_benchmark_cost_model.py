"""Table 2's cost model (benchmarks/table2_model.py): measured costs and the modelled time on hand-made inputs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from table2_model import (
    StrategyCosts,
    modelled_seconds,
    recovery_seconds,
    seed_interval,
    speedups,
    step_seconds,
)


def test_modelled_time_charges_each_strategy_its_measured_relative_step_cost():
    """A strategy 20% slower per step than checkpointing pays 1.2 x 91.5 s per step, lost steps included."""
    costs = StrategyCosts(step_s=0.12, recovery_s={"copy": 0.5})
    modelled = modelled_seconds(80, 5, [], costs, checkpoint_step_s=0.10)
    assert modelled == pytest.approx(85 * 91.5 * 1.2)


def test_recoveries_are_scaled_in_checkpointing_steps_the_same_way():
    """A 0.5 s recovery with checkpointing's step at 0.1 s costs 5 x 91.5 s, whatever the strategy."""
    costs = StrategyCosts(step_s=0.1, recovery_s={"copy": 0.5, "checkpoint": 1.0})
    modelled = modelled_seconds(10, 0, ["copy", "checkpoint", "copy"], costs, checkpoint_step_s=0.1)
    assert modelled == pytest.approx(10 * 91.5 + (0.5 + 1.0 + 0.5) / 0.1 * 91.5)


def test_unmeasured_recovery_method_falls_back_to_the_mean_and_missing_costs_are_named():
    """An unmeasured method costs the mean of the measured ones; with none measured the error names the fix."""
    costs = StrategyCosts(step_s=0.1, recovery_s={"copy": 0.2, "checkfree": 0.4})
    assert costs.recovery("checkpoint") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="paper_table2.py costs"):
        StrategyCosts(step_s=0.1).recovery("checkpoint")
    with pytest.raises(ValueError, match="positive"):
        modelled_seconds(10, 0, [], StrategyCosts(step_s=0.1), checkpoint_step_s=0.0)


def test_step_seconds_spans_the_window_including_a_save_stall():
    """The mean per step over the window counts a stall inside it (steps 1..5, a 0.5 s stall at step 4)."""
    steps = [1, 2, 3, 4, 5, 6]
    wall = [0.1, 0.2, 0.3, 0.9, 1.0, 1.1]
    assert step_seconds(steps, wall, (2, 5)) == pytest.approx((1.0 - 0.1) / 4)
    assert step_seconds(steps, wall, (1, 3)) == pytest.approx(0.3 / 3)


def test_step_seconds_refuses_a_window_with_a_rollback():
    """A window that saw a rollback (a repeated step) is refused, naming the fix."""
    with pytest.raises(ValueError, match="move the scheduled kills"):
        step_seconds([1, 2, 3, 2, 3, 4], [0.1, 0.2, 0.3, 0.8, 0.9, 1.0], (2, 4))


def test_recovery_seconds_is_the_gap_around_the_kill_less_one_step():
    """Commits at 1.0 and 3.5 around a kill at 1.2 with 0.1 s steps: the recovery cost 2.4 s."""
    assert recovery_seconds([0.9, 1.0, 3.5, 3.6], 1.2, 0.1) == pytest.approx(2.4)
    with pytest.raises(ValueError, match="lengthen"):
        recovery_seconds([0.9, 1.0], 1.2, 0.1)


def test_seed_interval_matches_scipy_one_sample_t_interval():
    """The mean and bounds over seeds equal scipy's one-sample t interval; one seed has no bounds."""
    values = [1.31, 1.52, 1.40]
    interval = seed_interval(values)
    low, high = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((sum(values) / 3, low, high))
    assert math.isnan(seed_interval([1.2]).low)


def test_speedups_pair_seeds_and_skip_runs_that_missed_the_target():
    """Speed-ups divide the reference by each seed's value and skip seeds missing on either side."""
    assert speedups([2.0, None, 3.0, 4.0], [1.0, 1.0, None, 2.0]) == [2.0, 2.0]


def test_recovery_kind_falls_back_to_the_same_method_then_to_every_measured_kind():
    """A cold copy not measured costs the measured warm copy; an unmeasured method the mean of every kind."""
    costs = StrategyCosts(
        step_s=0.1, recovery_s={"copy/warm": 0.2, "checkfree/warm": 0.4, "checkfree/cold": 3.0}
    )
    assert costs.recovery("copy/cold") == pytest.approx(0.2)
    assert costs.recovery("checkfree/warm") == pytest.approx(0.4)
    assert costs.recovery("checkpoint/warm") == pytest.approx((0.2 + 0.4 + 3.0) / 3)


def test_stages_lost_together_are_one_recovery_and_cold_when_any_stage_was():
    """Two stages lost at one step with one rollback count once, cold if either took no warm standby."""
    from checkfree_setup import recovery_methods

    failures = [
        {"step": 30, "stage": 1, "method": "checkfree", "rolled_back_to": 20, "warm_standby": True},
        {"step": 30, "stage": 2, "method": "checkfree", "rolled_back_to": 20, "warm_standby": False},
        {"step": 41, "stage": 0, "method": "copy", "rolled_back_to": None, "warm_standby": True},
    ]
    assert recovery_methods(failures) == ["checkpoint/cold", "copy/warm"]


def test_fixed_recovery_charges_the_given_modelled_seconds_unscaled():
    """With the paper's 30 s per recovery, recoveries add 30 s each whatever their measured time."""
    costs = StrategyCosts(step_s=0.2, recovery_s={"copy/warm": 5.0})
    modelled = modelled_seconds(
        10, 2, ["copy/warm", "copy/warm"], costs, checkpoint_step_s=0.1, fixed_recovery_s=30.0
    )
    assert modelled == pytest.approx(12 * 91.5 * 2.0 + 60.0)


def test_runs_of_separate_processes_merge_with_the_first_file_winning_per_run():
    """Seed 1 from its own file wins over the partial seed 1 of the all-seeds file; seed 0 comes from the latter."""
    from paper_table2 import merge_runs

    def part(seeds, tag):
        runs = [
            {"strategy": "checkpoint", "seed": s, "tag": tag, "executed_steps": 80, "error": None}
            for s in seeds
        ]
        reference = [
            {"strategy": "none", "seed": s, "tag": tag, "executed_steps": 75, "error": None} for s in seeds
        ]
        return {
            "seeds": seeds,
            "reference": reference,
            "runs": {"5%": runs},
            "load_before": [1.0],
            "load_after": [2.0],
            "machine": {"niceness": 10},
        }

    merged = merge_runs([part([1], "own"), part([0, 1], "all")])
    assert merged["seeds"] == [0, 1]
    assert {(r["seed"], r["tag"]) for r in merged["runs"]["5%"]} == {(1, "own"), (0, "all")}
    assert [p["seeds"] for p in merged["parts"]] == [[1], [0, 1]]


def test_step_intervals_give_each_step_its_commit_gap():
    """The gaps between commits per step of the window; their median ignores the one stalled step."""
    from table2_model import step_intervals

    gaps = step_intervals([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.9, 1.0, 1.1], (2, 5))
    assert gaps == pytest.approx([0.1, 0.1, 0.6, 0.1])


def test_a_run_that_never_started_gives_way_to_a_later_one_that_did():
    """A run whose stages timed out at start (0 steps, an error) is replaced by the same run from a later file."""
    from paper_table2 import merge_runs

    def part(executed, error):
        run = {"strategy": "checkfree", "seed": 0, "executed_steps": executed, "error": error}
        return {
            "seeds": [0],
            "reference": [],
            "runs": {"5%": [run]},
            "load_before": [1.0],
            "load_after": [1.0],
        }

    merged = merge_runs([part(0, "GetTimeoutError"), part(90, None)])
    assert merged["runs"]["5%"] == [{"strategy": "checkfree", "seed": 0, "executed_steps": 90, "error": None}]


def test_hybrid_notes_pair_its_modelled_hours_with_each_rival_by_seed():
    """Ratio rival/hybrid per seed (> 1: hybrid sooner), its interval and verdict; the goal's rate is marked."""
    from table2_notes import hybrid_notes

    def run(strategy, seed, hours):
        return {"strategy": strategy, "seed": seed, "modelled_h": hours}

    runs = {
        "runs": {
            "16%": [
                run("hybrid", 0, 1.0),
                run("hybrid", 1, 2.0),
                run("hybrid", 2, 3.0),
                run("redundant", 0, 1.5),
                run("redundant", 1, 3.1),
                run("redundant", 2, 4.4),
                run("checkfree+", 0, 1.0),
            ]
        }
    }
    notes = hybrid_notes(runs)
    assert len(notes) == 2
    assert (
        notes[0].startswith("16% (the goal's rate): redundant's modelled hours over hybrid's")
        and "hybrid faster" in notes[0]
    )
    assert notes[1].startswith("16%: checkfree+'s") and "no interval" in notes[1]  # one paired seed


def test_interleaved_blocks_replace_the_sequential_per_step_costs_and_keep_the_recoveries():
    """With interleaved blocks, a seed's per-step cost is the mean of its block means (the sequential round's
    recovery costs kept); the notes pair each block with checkpointing's block of the same round."""
    from table2_interleaved import round_ratios
    from table2_notes import costs_by_seed, drift_notes

    def row(strategy, step_s):
        steps = list(range(1, 11))
        return {
            "strategy": strategy,
            "seed": 0,
            "error": None,
            "steps": steps,
            "wall_times": [step_s * s for s in steps],
            "kill_offsets": {},
            "failures": [],
        }

    plus = row(
        "checkfree+", 0.10
    )  # one warm copy recovery after step 10: the next commit 0.5 s + a step later
    plus["steps"], plus["wall_times"] = [*plus["steps"], 10], [*plus["wall_times"], 1.0 + 0.5 + 0.1]
    plus["kill_offsets"] = {"10:0": 1.0}
    plus["failures"] = [
        {"step": 10, "stage": 0, "method": "copy", "rolled_back_to": None, "warm_standby": True}
    ]

    costs = {
        "layout": {"window": [2, 9]},
        "rows": [row("checkpoint", 0.30), plus],
        "interleaved": {
            "rounds": 2,
            "block_steps": 20,
            "seeds": {
                "0": {
                    "block_step_s": {
                        "checkpoint": [0.10, 0.20],
                        "checkfree+": [0.11, 0.22],
                        "none": [0.09, 0.18],
                    }
                }
            },
        },
    }
    per_seed = costs_by_seed(costs)
    assert per_seed[0]["checkpoint"].step_s == pytest.approx(0.15)
    assert per_seed[0]["checkfree+"].step_s == pytest.approx(0.165)
    # a recovery of 0.5 s in a run stepping at 0.10 s is 5 of its steps, so 5 x 0.165 s at the interleaved cost
    assert per_seed[0]["checkfree+"].recovery_s == {"copy/warm": pytest.approx(0.825)}
    assert per_seed[0]["none"].step_s == pytest.approx(0.135)
    assert round_ratios(costs["interleaved"], "checkfree+") == pytest.approx([1.1, 1.1])
    notes = drift_notes(costs)
    assert "interleaved across strategies" in notes[0]
    assert "checkfree+ 1.100" in notes[1] and "none 0.900" in notes[1]
