"""A step commits on every stage with every backup, or runs again: a stage lost between its optimizer step and its
backup copy (redundant), and a stage lost in the norm exchange of global clipping (only that stage is lost)."""

from __future__ import annotations

import pytest
import ray
import torch

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.stage import initial_stage_state
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)
REPLY_FLUSH_S = 0.5  # a kill waits this long, so the stage's earlier replies reach the driver first


def fail_at_call(
    executor: PipelineExecutor,
    stage: int,
    step: int,
    call: str,
    action: str = "kill",
    seconds: float = REPLY_FLUSH_S,
    timeout_s: float | None = None,
) -> None:
    """Arm `stage` before `step` so that its next `call` dies (or hangs); with `timeout_s`, the step bound from
    then on (earlier steps keep the generous first-step bound)."""

    def arm(ex: PipelineExecutor, at: int) -> None:
        if at != step or armed:
            return
        armed.append(at)
        if timeout_s is not None:
            ex.spec.recovery.step_timeout_s = timeout_s
        ray.get(ex.actors[stage].arm_fault.remote(call, action, seconds, 0), timeout=60)

    armed: list[int] = []
    executor.before_step.append(arm)


@pytest.fixture
def started(ray_local):
    made = []

    def make(spec) -> PipelineExecutor:
        executor = PipelineExecutor(spec)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown()


def _pids(executor: PipelineExecutor) -> list[int]:
    return [ping["pid"] for ping in ray.get([a.ping.remote() for a in executor.actors], timeout=60)]


def _alive(actors: list) -> list[str]:
    """Ids of the actors in `actors` that still answer."""
    alive = []
    for actor in actors:
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            continue
        alive.append(actor._actor_id.hex())
    return alive


def test_redundant_stage_lost_before_its_backup_lands_is_rebuilt_at_the_same_step(started):
    """Redundant: stage 2 dies after its step-3 optimizer step, as its state is read for stage 1's backup; after
    step 4 every stage's weights equal failure-free training's (a backup from step 2 would miss step 3)."""
    spec = tiny_spec("redundant")
    executor = started(spec)
    fail_at_call(executor, 2, 3, "get_state")
    executor.start()
    run_steps(executor, 4)
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    for step in range(1, 5):
        reference.train_step(*executor.corpus.train_batch(step, 2, 2), [[0, 1, 2, 3]] * 2)
    states = executor.stage_states()
    for stage, state in enumerate(states):
        expected = initial_stage_state(reference.parts, stage)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=f"stage {stage} {key}")
    assert [(f.step, f.stage, f.method, f.phase) for f in executor.history.failures] == [
        (3, 2, "redundant", "optimizer")
    ]
    assert executor.history.steps == [1, 2, 3, 4]


# the hanging stage's variant waits out its 20 s call bound: `extended`, as a hung stage killed, rebuilt and recorded
# as a timeout is in `make test` (test_checkfree_timeouts.py)
@pytest.mark.parametrize("action", ["kill", pytest.param("hang", marks=pytest.mark.extended)])
def test_global_clip_loses_only_the_stage_lost_before_its_norm(started, action):
    """Global clip: stage 1 dies (or hangs) after its backward, before its gradient norm: only stage 1 is lost and
    rebuilt by CheckFree (no rollback), the survivors keep their processes, and only the S live stages answer."""
    spec = tiny_spec("checkfree", optim={"clip": "global"})
    executor = started(spec)
    pids: dict = {}
    executor.before_step.append(lambda ex, at: pids.setdefault("before", _pids(ex)) if at == 3 else None)
    if action == "kill":
        fail_at_call(executor, 1, 3, "grad_sq_norm")
    else:
        fail_at_call(executor, 1, 3, "grad_sq_norm", "hang", 3600.0, timeout_s=20.0)
    executor.start()
    run_steps(executor, 4)
    reason = "died" if action == "kill" else "timeout"
    assert [
        (f.step, f.stage, f.method, f.phase, f.reason, f.rolled_back_to) for f in executor.history.failures
    ] == [(3, 1, "checkfree", "optimizer", reason, None)]
    assert executor.history.steps == [1, 2, 3, 4]
    after = _pids(executor)
    assert [after[i] for i in (0, 2, 3)] == [pids["before"][i] for i in (0, 2, 3)]
    assert after[1] != pids["before"][1]
    assert sorted(_alive(executor.pool.created)) == sorted(a._actor_id.hex() for a in executor.actors)
    assert executor.pool.group.bundle_count == spec.pipeline.num_stages
