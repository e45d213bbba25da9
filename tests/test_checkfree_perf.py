"""The CheckFree executor's fast paths on real Ray: standby pool, one-thread stages, no-wait failure injection."""

from __future__ import annotations

import pytest
import ray
import torch

from checkfree_ray.executor import PipelineExecutor
from schemas.train import TrainSpec

pytestmark = pytest.mark.timeout(300)


def spec_with(schedule, standby_actors: int = 2) -> TrainSpec:
    """A d=32, 4-layer, 4-stage CheckFree run with `standby_actors` warm standbys."""
    return TrainSpec.model_validate(
        {
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": True,
                "standby_actors": standby_actors,
            },
            "optim": {"lr": 3e-3},
            "recovery": {"strategy": "checkfree"},
            "failures": {"schedule": [list(item) for item in schedule]},
        }
    )


def test_back_to_back_failures_each_take_a_ready_standby_and_the_pool_refills(ray_local):
    """Kills at steps 3 and 4 (faster than a process starts) both take up standbys; the pool is full again after."""
    executor = PipelineExecutor(spec_with([(3, 1), (4, 2)]))
    executor.start()
    try:
        assert executor.pool.wait_standbys() == 2
        standby_pids = {
            ray.get(actor.ping.remote(), timeout=60)["pid"] for actor, _ in executor.pool.standbys
        }
        step = 1
        while step <= 5:
            step = executor.run_step(step)
        failures = executor.history.failures
        assert [(f.step, f.stage, f.warm_standby) for f in failures] == [(3, 1, True), (4, 2, True)]
        assert executor.history.steps == [1, 2, 3, 4, 5]
        pings = ray.get([a.ping.remote() for a in executor.actors], timeout=60)
        assert {pings[1]["pid"], pings[2]["pid"]} == standby_pids  # the pre-started processes took the stages
        assert all(p["torch_threads"] == 1 for p in pings)
        assert len(executor.pool.standbys) == 2  # refilled in the background
        assert executor.pool.wait_standbys() == 2
        assert all(f.detection_s > 0 for f in failures)
        assert len(executor.history.recovery_phases) == 2
    finally:
        executor.shutdown()


def test_interrupted_step_leaves_no_stage_stepped(ray_local):
    """A stage killed before step 3 fails phase 1; no survivor applied a partial step (weights as after step 2)."""
    executor = PipelineExecutor(spec_with([(3, 1)], standby_actors=1))
    seen: dict = {}
    executor.before_step.append(lambda ex, step: seen.setdefault(step, ex.stage_states(("blocks",))))
    executor.after_recovery.append(
        lambda ex, step, stages: seen.setdefault("after", ex.stage_states(("blocks",)))
    )
    executor.start()
    try:
        step = 1
        while step <= 3:
            step = executor.run_step(step)
        for stage in (0, 2, 3):
            for key, value in seen[3][stage].items():
                assert torch.equal(seen["after"][stage][key], value)
    finally:
        executor.shutdown()


def test_injected_kill_is_submitted_and_never_waited_for():
    """The injector only submits the stage's `terminate` (ordered before the step's calls) and returns: it never
    waits for the death (the step's calls find it), so a kill costs the driver no time."""
    from checkfree_ray.failures import FailureInjector

    submitted = []

    class Never:  # a call whose result never comes: waiting for it would hang this test
        def remote(self):
            submitted.append("terminate")
            return object()

    class Stage:
        terminate = Never()

    injector = FailureInjector(spec_with([(3, 1)]).failures, 4)
    killed_at = injector.kill(3, 1, Stage())
    assert submitted == ["terminate"] and injector.kill_times == {(3, 1): killed_at}
    assert injector.draw(3) == []  # fired once: the retried step is not killed again
