"""The training run's cluster timeline: stages alive follow the run's node events; a run on a cluster whose nodes
did not change writes no timeline."""

from __future__ import annotations

from checkfree_ray.training_timeline import stages_alive


def test_stages_alive_counts_lost_stages_until_rebuilt_or_handed_off():
    """A lost stage is down until rebuilt; a handed-off one is never down; a drain notice changes nothing."""
    events = [
        {"kind": "stage_lost", "stage": 1},
        {"kind": "stage_lost", "stage": 2},
        {"kind": "drain_notice", "stage": 3},
    ]
    assert stages_alive(4, events) == 2
    events.append({"kind": "stage_rebuilt", "stage": 1})
    assert stages_alive(4, events) == 3
    events += [{"kind": "handoff", "stage": 3}, {"kind": "stage_rebuilt", "stage": 2}]
    assert stages_alive(4, events) == 4
