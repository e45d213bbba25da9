"""The elastic evaluator pool's decisions (lcsc_ray/pool_sizing.py), without Ray; and `evaluators.min_actors`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lcsc_ray.pool_sizing import (
    CRASHED,
    NODE_LOST,
    START_FAIL,
    START_GO,
    START_WAIT,
    UNDECIDED,
    NodeView,
    concurrency,
    final_loss_kind,
    loss_kind,
    start_decision,
)
from schemas.search import EvaluatorSpec


@pytest.mark.parametrize(
    ("actor_state", "node", "kind"),
    [
        ("ALIVE", NodeView(alive=False), NODE_LOST),  # a reclaim: the GCS declared the node dead first
        ("DEAD", NodeView(alive=False), NODE_LOST),
        ("DEAD", NodeView(alive=True, draining=True), NODE_LOST),  # its drain's deadline came
        ("ALIVE", NodeView(alive=True, draining=True), NODE_LOST),
        ("DEAD", NodeView(alive=True), CRASHED),  # killed or crashed on a healthy node: the evaluator's own
        ("ALIVE", NodeView(alive=True), UNDECIDED),  # the GCS has not heard of the death yet
        (None, NodeView(alive=None), UNDECIDED),
        ("DEAD", NodeView(alive=None), UNDECIDED),
    ],
)
def test_a_loss_is_routine_only_when_the_node_is_dead_or_draining(actor_state, node, kind):
    assert loss_kind(actor_state, node) == kind


def test_a_loss_still_undecided_when_the_wait_ends_counts_as_the_evaluators_own():
    assert final_loss_kind(UNDECIDED) == CRASHED
    assert final_loss_kind(NODE_LOST) == NODE_LOST and final_loss_kind(CRASHED) == CRASHED


def test_the_pool_starts_with_what_fits_waiting_for_those_placed_and_fails_below_min_actors():
    go = {"min_actors": 2, "num_actors": 4, "grace_s": 30.0, "timeout_s": 300.0}
    assert start_decision(ready=4, constructing=0, elapsed_s=1.0, **go) == START_GO  # all up: no need to wait
    assert (
        start_decision(ready=2, constructing=0, elapsed_s=1.0, **go) == START_WAIT
    )  # the rest may be placed
    assert (
        start_decision(ready=2, constructing=0, elapsed_s=30.0, **go) == START_GO
    )  # past the grace: what fits
    # one is placed and still being constructed (crowded cores): it is waited for
    assert start_decision(ready=3, constructing=1, elapsed_s=60.0, **go) == START_WAIT
    assert start_decision(ready=3, constructing=1, elapsed_s=300.0, **go) == START_GO  # bounded
    assert start_decision(ready=1, constructing=0, elapsed_s=299.0, **go) == START_WAIT
    assert start_decision(ready=1, constructing=3, elapsed_s=300.0, **go) == START_FAIL


def test_tunes_concurrency_follows_the_live_pool_between_one_and_num_actors():
    assert [concurrency(3, live) for live in range(5)] == [1, 1, 2, 3, 3]


def test_min_actors_defaults_to_one_and_may_not_exceed_num_actors():
    assert EvaluatorSpec().min_actors == 1
    assert EvaluatorSpec(num_actors=3, min_actors=3).min_actors == 3
    with pytest.raises(
        ValidationError, match=r"`evaluators.min_actors` \(3\) exceeds `evaluators.num_actors` \(2\)"
    ):
        EvaluatorSpec(num_actors=2, min_actors=3)
    with pytest.raises(ValidationError, match="min_actors"):
        EvaluatorSpec(min_actors=0)
