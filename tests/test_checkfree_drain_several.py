"""Several stages on one draining node: the actors they lack are started at the notice, all at once, so the second
hand-off does not wait for a process start after the first (before, it was refused as 'drain_deadline_short'
once the one standby had gone to the first stage), and the spares a hand-off did not use are released."""

from __future__ import annotations

import time

import pytest
import ray

from checkfree_ray.draining import MARGIN_S, SAFETY_FACTOR, copy_estimate_s, stage_state_bytes
from tests.test_checkfree_drain import DOOMED, drain_spec, executor_for, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(300)


def test_two_stages_of_one_draining_node_are_both_handed_off(executor_for):  # noqa: F811
    """Stages 1 and 2 of 4 sit on a node that drains before step 3 with a deadline that fits a hand-off to a
    standby but not one that starts its process first: both are handed off, exactly (no step lost), and no spare
    actor or one-bundle group is left over beyond the one standby."""
    executor = executor_for(drain_spec("checkfree", stages=4))
    doomed = {executor.actors[1]._actor_id, executor.actors[2]._actor_id}
    state_bytes = stage_state_bytes(executor.cfg, 1)
    warm_needs = SAFETY_FACTOR * copy_estimate_s(state_bytes, 50e6, warm=True) + MARGIN_S
    cold_needs = SAFETY_FACTOR * copy_estimate_s(state_bytes, 50e6, warm=False) + MARGIN_S
    remaining_s = cold_needs - 1.0  # a cold hand-off does not fit, a warm one does with seconds to spare
    assert remaining_s > warm_needs + 8.0
    seen = {"step": 0, "deadline_ms": 0}

    def source():
        if seen["step"] < 3:
            return {}
        if not seen["deadline_ms"]:
            seen["deadline_ms"] = int(time.time() * 1000 + remaining_s * 1000)
        return {DOOMED: seen["deadline_ms"]}

    executor.drain.watcher.source = source
    executor.drain.locate = lambda actors: [DOOMED if a._actor_id in doomed else "alive" for a in actors]
    executor.before_step.insert(0, lambda ex, step: seen.update(step=step))
    run(executor, 4)
    records = sorted((f.step, f.stage, f.method, f.reason) for f in executor.history.failures)
    assert records == [(3, 1, "handoff", "drain"), (3, 2, "handoff", "drain")]
    assert executor.history.steps == [1, 2, 3, 4]
    assert not doomed & {a._actor_id for a in executor.actors}
    pool = executor.pool
    assert (
        len(pool.standbys) == pool.num_standbys == 1
    )  # the spare taken, the standby refilled, nothing extra
    ray.get([ping for _, ping in pool.standbys], timeout=120)
