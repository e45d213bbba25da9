"""The CheckFree executor on real Ray: equality with single-process training, and recovery from real kills."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.recovery_rules import micro_batch_order
from rayops import storage
from schemas.errors import RecoveryError
from schemas.train import TrainSpec

pytestmark = pytest.mark.timeout(180)


def tiny_spec(strategy: str, schedule=(), warm_standby: bool = False, **extra) -> TrainSpec:
    """A d=32, 4-layer, 4-stage model with 2 micro-batches of 2x16 bytes."""
    data = {
        "steps": 6,
        "eval_every": 3,
        "eval_batches": 2,
        "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
        "pipeline": {
            "num_stages": 4,
            "micro_batches": 2,
            "micro_batch_size": 2,
            "num_cpus_per_stage": 0.2,
            "warm_standby": warm_standby,
        },
        "optim": {"lr": 3e-3},
        "recovery": {"strategy": strategy},
        "failures": {"schedule": [list(item) for item in schedule]},
    }
    for key, value in extra.items():
        data.setdefault(key, {})
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return TrainSpec.model_validate(data)


def run_steps(executor: PipelineExecutor, last: int) -> None:
    step = 1
    while step <= last:
        step = executor.run_step(step)


@pytest.fixture
def executor_for(ray_local):
    made = []

    def make(spec: TrainSpec, checkpoint_uri: str | None = None) -> PipelineExecutor:
        executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
        made.append(executor)
        executor.start()
        return executor

    yield make
    for executor in made:
        executor.shutdown()


def test_pipeline_equals_single_process_then_none_strategy_stops(executor_for):
    """No failures: losses equal single-process training; then a kill under 'none' raises RecoveryError."""
    spec = tiny_spec("none", schedule=[(4, 2)])
    executor = executor_for(spec)
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    for step in range(1, 4):
        assert executor.run_step(step) == step + 1
        x, y = executor.corpus.train_batch(step, 2, 2)
        expected = reference.train_step(x, y, [micro_batch_order("none", 4, m) for m in range(2)])
        assert executor.history.losses[-1] == pytest.approx(expected, abs=1e-6)
    got = executor.stage_states()[2]["model/blocks/blocks.0.ffn.w1.weight"]
    torch.testing.assert_close(
        got, reference.parts.stages[2].blocks[0].ffn.w1.weight.detach(), atol=1e-6, rtol=0
    )
    assert executor.evaluate(3) == pytest.approx(
        reference.eval_loss(*executor.corpus.val_batches(2, 2)), abs=1e-6
    )
    with pytest.raises(RecoveryError, match="strategy` is 'none'"):
        executor.run_step(4)


def test_checkfree_rebuilds_middle_stage_as_gradient_weighted_average(executor_for):
    """A killed stage 1 equals (g0 W0 + g2 W2)/(g0 + g2) of its neighbours' blocks at that moment; lr x1.1 once."""
    spec = tiny_spec("checkfree", schedule=[(3, 1), (5, 1)], warm_standby=True)
    executor = executor_for(spec)
    seen: dict = {}

    def before(ex, step):
        if step in (3, 5):
            seen[step] = {
                "states": ex.stage_states(("blocks",)),
                "norms": [dict(n) for n in ex.grad_norms],
                "pid": ray.get(ex.actors[1].ping.remote())["pid"],
            }

    def after(ex, step, stages):
        seen[(step, "new")] = ex.stage_states(("blocks",))[1]
        seen[(step, "lr")] = ray.get(ex.actors[1].lr.remote())
        seen[(step, "pid")] = ray.get(ex.actors[1].ping.remote())["pid"]

    executor.before_step.append(before)
    executor.after_recovery.append(after)
    run_steps(executor, 6)
    assert [(f.step, f.stage, f.method) for f in executor.history.failures] == [
        (3, 1, "checkfree"),
        (5, 1, "checkfree"),
    ]
    assert executor.history.steps == [1, 2, 3, 4, 5, 6]  # each interrupted step ran again and committed once
    for step in (3, 5):
        assert seen[(step, "pid")] != seen[step]["pid"]  # a new process
        states, norms = seen[step]["states"], seen[step]["norms"]
        g0, g2 = norms[0]["stage"] + 1e-4, norms[2]["stage"] + 1e-4  # what each stage clips, after clipping
        assert norms[0]["stage"] > 0 and norms[0]["stage"] != norms[2]["stage"]
        for key, value in seen[(step, "new")].items():
            expected = (g0 * states[0][key].double() + g2 * states[2][key].double()) / (g0 + g2)
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
        assert seen[(step, "lr")] == pytest.approx(3e-3 * 1.1)  # not 3e-3 * 1.1**2 after the second loss
    assert executor.history.failures[0].warm_standby
    assert executor.history.failures[0].detection_s >= 0


def test_checkfree_plus_rebuilds_outer_stages_from_swap_partner(executor_for):
    """A killed first stage equals its partner's blocks plus the embedding copy; likewise the last stage."""
    spec = tiny_spec("checkfree+", schedule=[(3, 0), (4, 3)])
    executor = executor_for(spec)
    seen: dict = {}

    def before(ex, step):
        seen[step] = ex.stage_states()

    def after(ex, step, stages):
        seen[(step, "new")] = ex.stage_states()

    executor.before_step.append(before)
    executor.after_recovery.append(after)
    run_steps(executor, 4)
    assert [(f.stage, f.method) for f in executor.history.failures] == [(0, "copy"), (3, "copy")]
    old, new = seen[3], seen[(3, "new")]
    for key, value in new[0].items():
        if key.startswith("model/blocks/"):
            assert torch.equal(value, old[1][key])  # the swap partner's weights, exactly
        else:
            assert key.startswith("model/embed/") and torch.equal(value, old[0][key])  # the embedding copy
    old, new = seen[4], seen[(4, "new")]
    assert torch.equal(
        new[3]["model/blocks/blocks.0.attn.qkv.weight"], old[2]["model/blocks/blocks.0.attn.qkv.weight"]
    )
    assert torch.equal(new[3]["model/head/lm.weight"], old[3]["model/head/lm.weight"])


def test_adjacent_losses_roll_back_to_s3_checkpoint_exactly(executor_for, s3_bucket):
    """Stages 1 and 2 lost together: every stage is restored to checkpoint_000002 on SeaweedFS, bit for bit."""
    spec = tiny_spec(
        "checkfree",
        schedule=[(4, 1), (4, 2)],
        checkpointing={"every": 2},
        storage={"forward_credentials": True},
    )  # the tests' Ray nodes have no keys of their own
    uri = f"{s3_bucket}/ckpt"
    executor = executor_for(spec, checkpoint_uri=uri)
    executor.before_step.append(
        lambda ex, step: ex.finish_checkpoints()
    )  # checkpoint 2 complete before the kill
    seen: dict = {}
    executor.before_step.append(
        lambda ex, step: seen.setdefault(step, ex.stage_states()) if step == 3 else None
    )
    executor.after_recovery.append(lambda ex, step, stages: seen.setdefault("restored", ex.stage_states()))
    run_steps(executor, 5)
    failures = executor.history.failures
    assert {(f.stage, f.method, f.rolled_back_to) for f in failures} == {
        (1, "checkpoint", 2),
        (2, "checkpoint", 2),
    }
    for saved, restored in zip(seen[3], seen["restored"]):  # state after step 2 == state restored
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert executor.history.steps == [1, 2, 3, 3, 4, 5]  # step 4 never committed; 3 ran again
    assert executor.finish_checkpoints() == 4  # the save of step 4 (written by the stages) is complete
    manifest = json.loads(storage.read_bytes(f"{executor.checkpoints.checkpoint_uri(4)}/MANIFEST.json"))
    assert (
        manifest["metadata"]["step"] == 4
        and manifest["metadata"]["run_id"] == executor.checkpoints.run.run_id
    )
    assert sorted(manifest["files"]) == ["history.json", *(f"stage_{i:03d}.safetensors" for i in range(4))]
    assert executor.checkpoints.steps() == [2, 4]  # keep=2 pruned checkpoint 0


@pytest.mark.parametrize("victim", ["replacement", "source"])
def test_stage_dying_during_recovery_is_recovered_too(executor_for, tmp_path, victim):
    """A node going down is seen one actor at a time: the replacement for stage 1 (placed before the node was
    marked dead), or stage 2 (a source of the rebuild), dies while stage 1 is being rebuilt. The recovery
    plans again from everything lost: a second rebuild, or a rollback when the lost stages are adjacent; the
    loss found during the recovery is recorded in phase 'recovery'."""
    spec = tiny_spec("checkfree", schedule=[(3, 1)], checkpointing={"every": 2})
    executor = executor_for(spec, checkpoint_uri=str(tmp_path / "ckpt"))
    executor.before_step.append(
        lambda ex, step: ex.finish_checkpoints()
    )  # checkpoint 2 complete before the kill
    take, taken = executor.pool.take, []

    def take_then_lose_one(**kwargs):
        actor, warm = take(**kwargs)
        taken.append(actor)
        if (
            len(taken) == 1
        ):  # an armed fault, ordered before the recovery's calls (`ray.kill` is asynchronous)
            doomed, call = (
                (actor, "configure") if victim == "replacement" else (executor.actors[2], "get_state")
            )
            ray.get(doomed.arm_fault.remote(call), timeout=60)
        return actor, warm

    executor.pool.take = take_then_lose_one
    run_steps(executor, 5)
    failures = [(f.step, f.stage, f.method, f.phase) for f in executor.history.failures]
    if victim == "replacement":  # the original loss, then its replacement's, lost during the recovery
        assert failures == [(3, 1, "checkfree", "before_step"), (3, 1, "checkfree", "recovery")]
        assert len(taken) == 2
    else:
        assert sorted(failures) == [(3, 1, "checkpoint", "before_step"), (3, 2, "checkpoint", "recovery")]
        assert {f.rolled_back_to for f in executor.history.failures} == {2}
    assert executor.history.steps == [1, 2, 3, 4, 5]  # the failed step 3 committed once, after the recovery
    assert all(torch.isfinite(torch.tensor(executor.history.losses)))


@pytest.mark.slow
def test_adjacent_losses_without_checkpoint_stop_with_clear_error(executor_for):
    """Two adjacent stages lost and no checkpoint: RecoveryError naming the fix, never silent training."""
    executor = executor_for(tiny_spec("checkfree+", schedule=[(2, 1), (2, 2)]))
    executor.run_step(1)
    with pytest.raises(RecoveryError, match="checkpointing.every"):
        executor.run_step(2)


@pytest.mark.slow
def test_redundant_recovery_is_exact_and_checkpoint_strategy_rolls_back(executor_for, tmp_path):
    """Redundant: losses equal a failure-free run; checkpoint strategy: restarts from its last checkpoint."""
    spec = tiny_spec("redundant", schedule=[(3, 2), (4, 0)])
    executor = executor_for(spec)
    run_steps(executor, 5)
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    expected = [
        reference.train_step(*executor.corpus.train_batch(s, 2, 2), [[0, 1, 2, 3]] * 2) for s in range(1, 6)
    ]
    assert executor.history.losses == pytest.approx(expected, abs=1e-6)
    assert [f.method for f in executor.history.failures] == ["redundant", "redundant"]
    assert executor.history.costs["redundant_bytes_held"] > 0
    executor.shutdown()
    executor = executor_for(
        tiny_spec("checkpoint", schedule=[(3, 1)], checkpointing={"every": 2}),
        checkpoint_uri=str(tmp_path / "ckpt"),
    )
    run_steps(executor, 4)
    assert executor.history.steps == [1, 2, 3, 4]  # the lost step 3 ran again from checkpoint 2
    assert [(f.step, f.method, f.rolled_back_to) for f in executor.history.failures] == [(3, "checkpoint", 2)]
