"""Copies and backups that land after the step bound, while every stage answers, are late, not lost: the step
commits (no failure, no rerun) instead of the run stopping with "did not finish ... although every stage answers".

Stage 0's `get_state` (the read behind CheckFree+'s embedding copy and the redundant backup of stage 0) stalls
for longer than `recovery.step_timeout_s`, as a stage's call queue does on a loaded node or after a stage moved."""

from __future__ import annotations

import pytest

from checkfree_ray.executor import PipelineExecutor
from tests.test_checkfree_corner_commit import fail_at_call
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(300)
STEP_TIMEOUT_S = 10.0  # the step bound from step 3 on
STALL_S = 15.0  # the copy's read stalls past the bound, and ends within the pings' bound after it


# both strategies wait for their replicas in one place (`StageGroup._collect_replicas`): `make test` runs the
# redundant backups, CheckFree+'s copies are the `extended` variant
@pytest.mark.parametrize(
    ("strategy", "held"),
    [
        pytest.param("checkfree+", "copy_bytes_held", marks=pytest.mark.extended),
        ("redundant", "redundant_bytes_held"),
    ],
)
def test_copies_and_backups_that_land_late_commit_the_step(ray_local, strategy, held):
    executor = PipelineExecutor(tiny_spec(strategy))
    try:
        fail_at_call(executor, 0, 3, "get_state", "hang", STALL_S, timeout_s=STEP_TIMEOUT_S)
        executor.start()
        executor.history.costs.pop(held, None)
        run_steps(executor, 4)
        assert executor.history.steps == [1, 2, 3, 4]
        assert executor.history.failures == []
        assert executor.history.costs[held] > 0  # counted again after the step that was late
    finally:
        executor.shutdown()
