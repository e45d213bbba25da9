"""A stage killed at every phase of a step (torchft-style `fail_at` harness): each run finishes and names the phase."""

from __future__ import annotations

import pytest
import ray
import torch

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)

# Where the armed fault fires: (actor call, calls of that kind to let through first).
# a kill waits this long, so the replies of the stage's earlier calls reach the driver before it dies
REPLY_FLUSH_S = 0.5
PHASES = {"forward": ("forward", 1), "backward": ("backward", 0), "optimizer": ("step", 0)}


def fail_at(executor: PipelineExecutor, stage: int, step: int, phase: str) -> None:
    """Kill `stage` at `step` in `phase`: 'before_step' (the kill is queued ahead of the step), 'forward' (at its
    second forward call: after some forward work), 'backward' (its first backward), 'optimizer' (as its optimizer
    step starts, while the other stages step)."""

    def arm(ex: PipelineExecutor, at: int) -> None:
        if at != step or (at, stage) in armed:
            return
        armed.add((at, stage))
        if phase == "before_step":
            ex.actors[stage].terminate.remote()
        else:
            call, skip = PHASES[phase]
            ray.get(ex.actors[stage].arm_fault.remote(call, "kill", REPLY_FLUSH_S, skip), timeout=60)

    armed: set = set()
    executor.before_step.append(arm)


@pytest.fixture
def started(ray_local):
    made = []

    def make(spec, checkpoint_uri=None) -> PipelineExecutor:
        executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown()


def _watch(executor: PipelineExecutor, step: int) -> dict:
    seen: dict = {}
    executor.before_step.insert(
        0,
        lambda ex, at: (
            seen.update(before=ex.stage_states(("blocks",)), norms=[dict(n) for n in ex.grad_norms])
            if at == step
            else None
        ),
    )
    executor.after_recovery.append(
        lambda ex, at, stages: seen.update(
            after=ex.stage_states(("blocks",)), norms_after=[dict(n) for n in ex.grad_norms]
        )
    )
    return seen


@pytest.mark.parametrize("phase", ["before_step", "forward", "backward"])
def test_stage_lost_before_its_optimizer_step_reruns_the_step_from_unstepped_survivors(started, phase):
    """(a) before the step, (b) mid-forward, (c) mid-backward: the record names the phase, no survivor stepped
    (their weights are those before the step) and the step commits once after the rebuild."""
    executor = started(tiny_spec("checkfree", warm_standby=True))
    fail_at(executor, 1, 3, phase)
    seen = _watch(executor, 3)
    executor.start()
    run_steps(executor, 4)
    assert [(f.step, f.stage, f.method, f.phase, f.reason) for f in executor.history.failures] == [
        (3, 1, "checkfree", phase, "died")
    ]
    assert executor.history.steps == [1, 2, 3, 4]
    for stage in (0, 2, 3):
        assert all(torch.equal(seen["after"][stage][k], v) for k, v in seen["before"][stage].items())


def test_stage_lost_at_its_optimizer_step_is_rebuilt_from_the_same_step(started):
    """(d) stage 1 dies as the others step: its rebuild sums the neighbours' weights after step 3 with weights from
    their step-3 gradient norms (not step 2's), and step 3 commits once (rolled forward, never run twice)."""
    executor = started(tiny_spec("checkfree", warm_standby=True))
    fail_at(executor, 1, 3, "optimizer")
    seen = _watch(executor, 3)
    executor.start()
    run_steps(executor, 4)
    assert [(f.step, f.stage, f.phase) for f in executor.history.failures] == [(3, 1, "optimizer")]
    assert executor.history.steps == [1, 2, 3, 4]
    before, after, norms = seen["before"], seen["after"], seen["norms_after"]
    key = "model/blocks/blocks.0.ffn.w1.weight"
    assert not torch.equal(before[0][key], after[0][key])  # the neighbours had stepped
    assert norms[0]["stage"] != seen["norms"][0]["stage"]  # and their norms are step 3's
    g0, g2 = norms[0]["stage"] + 1e-4, norms[2]["stage"] + 1e-4
    for name, value in after[1].items():
        expected = (g0 * after[0][name].double() + g2 * after[2][name].double()) / (g0 + g2)
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_redundant_never_restores_a_pre_step_backup_into_a_committed_step(started):
    """(d) redundant: stage 2 dies at its optimizer step; the survivors undo their step and step 3 runs again, so
    the losses equal failure-free training exactly (a pre-step backup in a committed step would differ)."""
    spec = tiny_spec("redundant")
    executor = started(spec)
    fail_at(executor, 2, 3, "optimizer")
    executor.start()
    run_steps(executor, 5)
    assert [(f.step, f.stage, f.method, f.phase) for f in executor.history.failures] == [
        (3, 2, "redundant", "optimizer")
    ]
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    expected = [
        reference.train_step(*executor.corpus.train_batch(s, 2, 2), [[0, 1, 2, 3]] * 2) for s in range(1, 6)
    ]
    assert executor.history.steps == [1, 2, 3, 4, 5]
    assert executor.history.losses == pytest.approx(expected, abs=1e-6)


def test_stage_lost_during_a_recovery_is_recorded_in_the_recovery_phase(started, tmp_path):
    """(f) stage 2 dies while it serves its blocks to rebuild stage 1: both are recorded, stage 2 in phase
    'recovery', and the adjacent pair rolls back to checkpoint 2; the run finishes."""
    spec = tiny_spec("checkfree", schedule=[(3, 1)], checkpointing={"every": 2})
    executor = started(spec, checkpoint_uri=str(tmp_path / "ckpt"))
    executor.before_step.append(
        lambda ex, at: (
            ray.get(ex.actors[2].arm_fault.remote("get_state"), timeout=60)
            if at == 3 and not ex.history.failures
            else None
        )
    )
    executor.start()
    run_steps(executor, 4)
    records = {(f.step, f.stage, f.method, f.phase, f.rolled_back_to) for f in executor.history.failures}
    assert records == {(3, 1, "checkpoint", "before_step", 2), (3, 2, "checkpoint", "recovery", 2)}
    assert executor.history.steps[-1] == 4 and 3 in executor.history.steps
