"""Every wait is bounded: a stage that hangs is lost by timeout, rebuilt and recorded; never a raw traceback."""

from __future__ import annotations

import pytest
import ray

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.stage import StageActor
from checkfree_ray.timeouts import FIRST_STEP_TIMEOUT_S
from schemas.errors import RecoveryError
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)


def test_default_step_timeout_is_a_multiple_of_the_median_step_with_a_floor():
    """Unset: 300 s before any step, then max(30 s, 10x the median step); a spec value wins."""
    executor = PipelineExecutor(tiny_spec("checkfree"))
    assert executor.step_timeout() == FIRST_STEP_TIMEOUT_S
    executor.history.step_times = [0.5, 0.2, 9.0]
    assert executor.step_timeout() == 30.0  # 10 x 0.5 s is under the floor
    executor.history.step_times = [4.0, 5.0, 6.0]
    assert executor.step_timeout() == 50.0
    assert PipelineExecutor(tiny_spec("checkfree", recovery={"step_timeout_s": 7.5})).step_timeout() == 7.5


def test_hung_stage_is_killed_rebuilt_and_recorded_as_timeout(ray_local):
    """Stage 2 hangs in its second forward of step 3: after the step timeout it is killed (a new process takes
    its place), the failure says reason 'timeout' in phase 'forward', survivors answer (none is killed for
    silence: their calls waiting on the stuck stage fail once it is killed) and the run ends."""
    executor = PipelineExecutor(tiny_spec("checkfree", warm_standby=True))
    pids: dict = {}

    def pids_now(ex) -> list[int]:
        return [ping["pid"] for ping in ray.get([a.ping.remote() for a in ex.actors], timeout=60)]

    def hang(ex, step):
        if step == 3 and "before" not in pids:
            pids["before"] = pids_now(ex)
            # Only from the hung step on is the bound this short: steps 1-2 (lazy imports on a loaded machine)
            # keep the generous first-step bound, so no healthy step can time out.
            ex.spec.recovery.step_timeout_s = 20.0
            ray.get(ex.actors[2].arm_fault.remote("forward", "hang", 3600.0, 1), timeout=60)

    executor.before_step.append(hang)
    executor.after_recovery.append(lambda ex, step, stages: pids.update(after=pids_now(ex)))
    try:
        executor.start()
        run_steps(executor, 4)
    finally:
        executor.shutdown()
    assert [(f.step, f.stage, f.reason, f.phase) for f in executor.history.failures] == [
        (3, 2, "timeout", "forward")
    ]
    assert executor.history.steps == [1, 2, 3, 4]
    assert pids["after"][2] != pids["before"][2]  # a new process took the hung stage
    assert [pids["after"][i] for i in (0, 1, 3)] == [pids["before"][i] for i in (0, 1, 3)]  # survivors kept


def test_replacement_that_cannot_be_scheduled_names_the_missing_resources(ray_local):
    """A replacement that never gets its CPUs fails the run with RecoveryError naming num_cpus_per_stage."""
    executor = PipelineExecutor(tiny_spec("checkfree", schedule=[(2, 1)]))
    impossible = []

    def take(**kwargs):
        actor = StageActor.options(num_cpus=512).remote(executor.cfg, 1.0, 0.0, 1)
        impossible.append(actor)
        return actor, False

    try:
        executor.start()
        executor.pool.node_wait_s = 3.0  # `recovery.node_wait_s`, after the stages started
        executor.pool.take = take
        executor.run_step(1)
        with pytest.raises(
            RecoveryError,
            match=r"stage\(s\) \[1\] got no node within 3s \(`recovery.node_wait_s`\).*num_cpus_per_stage",
        ):
            executor.run_step(2)
    finally:
        for actor in impossible:
            ray.kill(actor, no_restart=True)
        executor.shutdown()
