"""Hybrid recovery's failure count: a drain hand-off moves a stage with nothing lost, so it is not a stage loss and
does not shorten the Young/Daly checkpoint interval."""

from __future__ import annotations

from checkfree_ray.history import History
from checkfree_ray.hybrid import HybridPolicy, observe
from schemas.train_result import FailureRecord
from tests.test_checkfree_engine import tiny_spec


def _history(handoffs: int, losses: int) -> History:
    """Ten steps of 0.5 s, one measured save of 1 s, and the given hand-offs and CheckFree+ losses."""
    history = History(
        steps=list(range(1, 11)),
        step_times=[0.5] * 10,
        wall_times=[0.5 * i for i in range(1, 11)],
        costs={"checkpoint_saves": 1.0, "checkpoint_save_s_total": 1.0},
    )
    history.failures = [
        FailureRecord(step=2, stage=1, method="handoff", detection_s=0.0, recovery_s=0.2, reason="drain")
        for _ in range(handoffs)
    ]
    history.failures += [
        FailureRecord(step=3, stage=2, method="copy", detection_s=0.0, recovery_s=0.1) for _ in range(losses)
    ]
    return history


def test_drain_handoffs_are_not_counted_as_stage_losses():
    """Five hand-offs and one loss observe as one loss, and give the interval of one loss alone (not of six)."""
    assert observe(_history(handoffs=5, losses=1), 4).failures == 1
    spec = tiny_spec("hybrid", steps=400, recovery={"strategy": "hybrid", "expected_mtbf_s": 50.0})
    intervals = []
    for handoffs in (0, 5):
        policy = HybridPolicy.from_spec(spec)
        history = _history(handoffs=handoffs, losses=1)
        policy.retune(11, history)
        intervals.append(policy.every)
    assert intervals[0] == intervals[1]
    policy = HybridPolicy.from_spec(spec)
    policy.retune(11, _history(handoffs=0, losses=6))
    assert policy.every < intervals[0]  # six real losses do shorten it
