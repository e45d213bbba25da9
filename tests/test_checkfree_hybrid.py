"""Hybrid recovery: the Young/Daly checkpoint interval, its re-tuning as failures come in, and a run on real Ray where
CheckFree+ rebuilds a single lost stage and two adjacent lost stages roll back to the latest asynchronous checkpoint."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from checkfree_ray import hybrid
from checkfree_ray.hybrid import HybridPolicy, Observed, decide
from schemas.train import TrainSpec
from schemas.train_result import FailureRecord, TrainResult
from tests.test_checkfree_engine import run_steps, tiny_spec


# ----- the pure policy ------------------------------------------------------------------------------------------
def test_young_daly_on_hand_made_inputs():
    """sqrt(2 x 8 s x 900 s) = 120 s; at 0.5 s per step 240 steps; clamped to the bounds; no save cost: low bound."""
    assert hybrid.young_daly_interval_s(8.0, 900.0) == pytest.approx(120.0)
    assert hybrid.young_daly_interval_s(0.5, 100.0) == pytest.approx(10.0)
    assert hybrid.interval_steps(120.0, 0.5) == 240
    assert hybrid.interval_steps(120.0, 0.5, high=100) == 100
    assert hybrid.interval_steps(0.0, 0.5, low=3) == 3
    assert hybrid.interval_steps(math.inf, 0.5, high=77) == 77
    with pytest.raises(ValueError, match="MTBF"):
        hybrid.young_daly_interval_s(1.0, 0.0)


def test_decide_uses_the_adjacent_loss_mtbf():
    """4 stages, prior 1 loss per 100 s per stage, no time seen: rollbacks at 3 x 0.01^2 x 0.5 /s (MTBF 6667 s), so
    the interval is sqrt(2 x 2 x 6667) = 163.3 s = 327 steps; the record says why."""
    observed = Observed(elapsed_s=0.0, step_s=0.5, save_cost_s=2.0, failures=0, rollbacks=0)
    record = decide(observed, 4, (0.01, "recovery.expected_mtbf_s=100s"))
    mtbf = 1.0 / (3 * 0.01**2 * 0.5)  # the Gamma prior's mean with no exposure
    assert record["mtbf_s"] == pytest.approx(mtbf)
    assert record["interval_s"] == pytest.approx(math.sqrt(2 * 2.0 * mtbf))
    assert record["every"] == round(math.sqrt(2 * 2.0 * mtbf) / 0.5) == 327
    assert record["stage_mtbf_s"] == pytest.approx(100.0)
    assert "Young/Daly" in record["reason"] and "expected_mtbf_s=100s" in record["reason"]


def test_interval_shortens_as_failures_and_rollbacks_are_seen():
    """More losses seen than the prior expects raise the estimated rate (Gamma posterior), so the interval shrinks;
    a rollback seen shrinks it further; a save longer than the interval raises the low bound."""
    prior = (1e-4, "prior")
    quiet = decide(Observed(1000.0, 0.5, 1.0, failures=0, rollbacks=0), 4, prior)
    busy = decide(Observed(1000.0, 0.5, 1.0, failures=40, rollbacks=0), 4, prior)
    rolled = decide(Observed(1000.0, 0.5, 1.0, failures=40, rollbacks=2), 4, prior)
    assert busy["stage_mtbf_s"] == pytest.approx((1 / 1e-4 + 4 * 1000.0) / 41)
    assert quiet["every"] > busy["every"] > rolled["every"] >= 2
    slow_save = decide(Observed(1000.0, 0.5, 30.0, failures=40, rollbacks=2), 4, prior)
    assert slow_save["every"] >= 60  # one save in flight at a time: 30 s / 0.5 s


def test_prior_sources_in_precedence():
    """The user's MTBF wins over the spec's failure model, the hourly rate over the per-step one; else 5%/hour."""
    rate, source = hybrid.prior_stage_rate(200.0, 0.1, 0.01, 0.5)
    assert rate == pytest.approx(1 / 200) and "expected_mtbf_s" in source
    rate, source = hybrid.prior_stage_rate(None, 0.1, 0.01, 0.5)
    assert rate == pytest.approx(-math.log(0.9) / 3600) and "hourly_rate" in source
    rate, source = hybrid.prior_stage_rate(None, None, 0.01, 0.5)
    assert rate == pytest.approx(-math.log(0.99) / 0.5) and "probability_per_step" in source
    rate, source = hybrid.prior_stage_rate(None, None, None, 0.5)
    assert rate == pytest.approx(-math.log(0.95) / 3600) and "default" in source


def _history(step_times, saves, failures=()):
    wall, t = [], 0.0
    for s in step_times:
        t += s
        wall.append(t)
    return SimpleNamespace(
        step_times=list(step_times),
        wall_times=wall,
        failures=list(failures),
        costs={"checkpoint_saves": float(saves), "checkpoint_save_s_total": 1.0 * saves},
        checkpoint_intervals=[],
    )


def test_policy_retunes_after_failures_and_restarts_counting_after_a_rollback():
    """The policy saves at step 0, keeps the first interval (100) until a save is measured, then re-tunes (recorded
    once per change); after 8 losses in 5 s the interval is much shorter; after a rollback to step 4 it counts
    from 4."""
    spec = tiny_spec("hybrid", steps=400, recovery={"strategy": "hybrid", "expected_mtbf_s": 50.0})
    policy = HybridPolicy.from_spec(spec)
    assert (policy.every, policy.max_every) == (hybrid.FIRST_EVERY, hybrid.MAX_EVERY)
    history = _history([0.5] * 10, saves=0)
    assert policy.due(0, history) and not policy.due(99, history) and policy.due(100, history)
    assert history.checkpoint_intervals == []  # no save measured yet: nothing to tune from
    history = _history([0.5] * 10, saves=1)
    assert not policy.due(101, history)
    first = history.checkpoint_intervals[-1]
    assert first["step"] == 101 and first["every"] == policy.every == 162 and first["failures_seen"] == 0
    losses = [
        FailureRecord(step=s, stage=1, method="copy", detection_s=0.0, recovery_s=0.1) for s in range(1, 9)
    ]
    history.failures = losses
    policy.due(102, history)
    assert history.checkpoint_intervals[-1]["failures_seen"] == 8
    assert history.checkpoint_intervals[-1]["every"] < first["every"] / 5
    policy.last_start = 30  # a save started after step 30, then a rollback to checkpoint 4: step 5 runs next
    assert not policy.due(5, history) and policy.last_start == 4
    every = policy.every
    assert not policy.due(4 + every - 1, history) and policy.due(4 + every, history)


def test_spec_accepts_hybrid_with_checkfree_plus_constraints():
    """'hybrid' validates, defaults to checkpoints (so its store exists), round-trips, and shares CheckFree+'s
    layout checks (odd micro-batches are refused naming the strategy)."""
    spec = tiny_spec("hybrid", recovery={"strategy": "hybrid", "expected_mtbf_s": 3600.0})
    assert spec.checkpoint_every() == 100
    assert TrainSpec.model_validate(spec.model_dump(mode="json")) == spec
    with pytest.raises(ValueError, match="'hybrid'"):
        tiny_spec("hybrid", pipeline={"micro_batches": 3})
    assert (
        hybrid.rebuild_strategy("hybrid") == "checkfree+"
        and hybrid.rebuild_strategy("checkpoint") == "checkpoint"
    )


# ----- a run on real Ray ------------------------------------------------------------------------------------------
@pytest.mark.timeout(480)  # 183 s measured at load average 95 on 2 cores
def test_hybrid_rebuilds_a_single_loss_and_rolls_adjacent_losses_back(ray_local, tmp_path):
    """Stage 0 lost at step 3 is rebuilt by CheckFree+'s copy (no rollback); stages 1 and 2 lost together at step 9
    roll back to the latest asynchronous checkpoint, a save after the copy chosen by the policy; the rerun steps
    after it give the same losses as their first run (weights, Adam and the rebuilt stage's lr restored exactly)."""
    from checkfree_ray.executor import PipelineExecutor
    from checkfree_ray.train import build_result

    spec = tiny_spec(
        "hybrid",
        schedule=[(3, 0), (9, 1), (9, 2)],
        steps=10,
        checkpointing={"every": 2},
        recovery={"strategy": "hybrid", "expected_mtbf_s": 60.0},
    )  # at most 2 steps between saves
    executor = PipelineExecutor(spec, checkpoint_uri=str(tmp_path / "ckpt"))
    try:
        executor.start()
        saves, start_save = [], executor.saver.start
        executor.saver.start = lambda step, *args: (saves.append(step), start_save(step, *args))
        run_steps(executor, 10)
        h = executor.history
        methods = [(f.step, f.stage, f.method, f.rolled_back_to) for f in h.failures]
        assert methods[0] == (3, 0, "copy", None)
        rollbacks = {f.rolled_back_to for f in h.failures if f.step == 9}
        assert [m[2] for m in methods[1:]] == ["checkpoint", "checkpoint"] and len(rollbacks) == 1
        restored = rollbacks.pop()
        # the latest save the policy started before the loss (a save in flight is finished first), after the copy;
        # or the one before it when the lost stages had not yet written their shards of the latest (on loaded cores
        # a write can still be running when its stage is killed: that save is incomplete and never loaded)
        started_before = sorted(s for s in saves if s < 9)
        assert restored in started_before[-2:] and restored >= 4, (restored, saves)
        chosen = h.checkpoint_intervals
        assert chosen and chosen[0]["every"] >= hybrid.MIN_EVERY and "Young/Daly" in chosen[0]["reason"]
        assert chosen[0]["prior"] == "recovery.expected_mtbf_s=60s"
        first_run = h.steps.index(restored + 1)
        rerun = len(h.steps) - 1 - h.steps[::-1].index(restored + 1)
        span = 9 - (restored + 1)  # steps restored+1 .. 8, run twice
        assert (
            h.steps[first_run : first_run + span]
            == h.steps[rerun : rerun + span]
            == list(range(restored + 1, 9))
        )
        assert all(h.rolled_back[first_run : first_run + span])
        assert h.losses[rerun : rerun + span] == pytest.approx(
            h.losses[first_run : first_run + span], rel=1e-6
        )
        assert h.steps[-1] == 10
        result = build_result(executor, 1.0)
        assert (
            TrainResult.model_validate(result.model_dump(mode="json")).checkpoint_intervals[0].every
            == chosen[0]["every"]
        )
    finally:
        executor.shutdown()
