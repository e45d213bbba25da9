"""A seeded plan of spot events can be asked to hold both kinds: reclaims without notice and drains."""

from __future__ import annotations

import pytest

from rayops.spot_events import DRAIN, RECLAIM, plan_spot_events


def test_both_kinds_turns_a_one_kind_plan_into_a_mixed_one_and_leaves_mixed_plans_alone():
    one_kind = [s for s in range(200) if len({e.kind for e in plan_spot_events(s, 3, 60.0)}) == 1]
    assert one_kind, "some seeds draw a single kind for 3 events (1 in 4 on average)"
    for seed in one_kind:
        plain, mixed = plan_spot_events(seed, 3, 60.0), plan_spot_events(seed, 3, 60.0, both_kinds=True)
        assert {e.kind for e in mixed} == {RECLAIM, DRAIN}
        assert sum(a.kind != b.kind for a, b in zip(plain, mixed)) == 1  # one event changed kind
        assert [(e.at_s, e.pick) for e in plain] == [(e.at_s, e.pick) for e in mixed]  # moments, targets kept
        assert mixed == plan_spot_events(seed, 3, 60.0, both_kinds=True)  # seeded
    for seed in set(range(50)) - set(one_kind):
        assert plan_spot_events(seed, 3, 60.0, both_kinds=True) == plan_spot_events(seed, 3, 60.0)


def test_both_kinds_needs_two_events():
    with pytest.raises(ValueError, match="both_kinds needs count >= 2"):
        plan_spot_events(0, 1, 60.0, both_kinds=True)
