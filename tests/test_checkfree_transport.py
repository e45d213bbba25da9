"""Activation transport: which one a run picks, its clean fallback, and the Ray Direct Transport path run for real
with gloo between CPU stages (the code path NCCL takes between GPU stages)."""

from __future__ import annotations

import logging

import pytest
import ray
import torch

from checkfree_ray import transport as transport_module
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.recovery_rules import BLOCKS, EMBED
from checkfree_ray.transport import Transport, may_be_direct, select_transport
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize(
    "requested,gpus,nccl,strategy,expected",
    [
        ("auto", 0.0, [False] * 4, "checkpoint", "object_store"),  # CPU stages: nothing changes
        ("auto", 1.0, [True] * 4, "checkpoint", "nccl"),
        ("auto", 1.0, [True] * 4, "none", "nccl"),
        ("auto", 1.0, [True, True, False, True], "checkpoint", "object_store"),  # one stage without NCCL
        ("auto", 1.0, [True] * 4, "checkfree", "object_store"),  # a lost stage would take its neighbour along
        ("nccl", 1.0, [True] * 4, "checkfree", "nccl"),  # asked for explicitly: used
        ("nccl", 1.0, [False] * 4, "checkfree", "object_store"),  # asked for, not there: falls back
        ("gloo", 0.0, [False] * 4, "checkfree", "gloo"),
        ("object_store", 1.0, [True] * 4, "none", "object_store"),
    ],
)
def test_transport_selection(requested, gpus, nccl, strategy, expected):
    """'auto' is NCCL only on GPU stages that all have NCCL under a whole-model strategy; explicit choices win
    where they can run; the reason says why in words."""
    name, reason = select_transport(requested, gpus, nccl, strategy)
    assert name == expected
    assert reason and (expected != "object_store" or requested == "object_store" or "'" in reason)


def test_nccl_without_gpus_is_refused_naming_both_fields_and_cpu_runs_never_make_direct_actors():
    """A spec asking for NCCL on CPU stages names both fields; a default CPU spec keeps plain stage actors."""
    with pytest.raises(ValueError, match=r"activation_transport` 'nccl'.*num_gpus_per_stage` is 0"):
        tiny_spec("checkfree", pipeline={"activation_transport": "nccl"})
    assert not may_be_direct(tiny_spec("checkfree"))
    assert may_be_direct(tiny_spec("checkfree", pipeline={"activation_transport": "gloo"}))


class _Call:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def remote(self, *args, **kwargs):
        self.log.append((self.name, "object_store", kwargs))
        return "ref"

    def options(self, tensor_transport: str):
        outer = self

        class _Direct:
            def remote(self, *args, **kwargs):
                outer.log.append((outer.name, tensor_transport, kwargs))
                return "ref"

        return _Direct()


class _FakeActor:
    def __init__(self, index: int, log: list):
        self._actor_id, self.forward, self.ping = f"actor-{index}", _Call(log, "forward"), _Call([], "ping")


def test_a_group_that_cannot_be_formed_falls_back_to_the_object_store_said_once(monkeypatch, caplog):
    """create_collective_group failing: the transport becomes the object store, one warning names the cause, and the
    calls after it go without tensor_transport (before it, a direct call carried tensor_transport and as_tensor)."""
    calls: list = []
    actors = [_FakeActor(i, calls) for i in range(4)]
    transport = Transport("gloo")
    transport.submit(actors[0], "forward", True, 1)
    assert calls[-1] == ("forward", "gloo", {"as_tensor": True})

    def broken(*_args, **_kwargs):
        raise RuntimeError("gloo rendezvous failed")

    monkeypatch.setattr("ray.experimental.collective.create_collective_group", broken)
    monkeypatch.setattr(
        transport_module.ray, "get", lambda refs, timeout=None: [{}] * len(refs)
    )  # every ping answers
    with caplog.at_level(logging.WARNING, logger=transport_module.__name__):
        transport.connect(actors, timeout_s=5.0)
        transport.connect(actors, timeout_s=5.0)
    assert transport.name == "object_store" and not transport.direct
    warnings = [r.getMessage() for r in caplog.records if r.name == transport_module.__name__]
    assert len(warnings) == 1 and "gloo rendezvous failed" in warnings[0] and "object store" in warnings[0]
    transport.submit(actors[0], "forward", True, 1)
    assert calls[-1] == ("forward", "object_store", {})


def test_gloo_direct_transport_trains_like_single_process_and_really_bypasses_the_object_store(ray_local):
    """Four CPU stages with activation_transport gloo: 2 steps equal single-process training to 1e-6 under 1F1B; a
    forward's activation is an RDT object (the driver may not fetch it) that the next stage consumes correctly."""
    spec = tiny_spec("checkfree", pipeline={"activation_transport": "gloo", "schedule": "1f1b"})
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    executor = PipelineExecutor(spec)
    try:
        executor.start()
        assert executor.transport.name == "gloo" and executor.transport.connected(executor.actors)
        run_steps(executor, 2)
        x, _ = executor.corpus.val_batches(1, 2)
        a0, a1 = executor.actors[0], executor.actors[1]
        direct = executor.transport.submit(
            a0, "forward", True, 0, 0, (EMBED, BLOCKS), x[0].numpy(), None, 1.0, False
        )
        via_store = a0.forward.remote(0, 0, (EMBED, BLOCKS), x[0].numpy(), None, 1.0, False)
        with pytest.raises(ValueError, match="two-sided transport GLOO"):
            ray.get(direct, timeout=60)
        out_direct = ray.get(a1.forward.remote(0, 1, (BLOCKS,), direct, None, 1.0, False), timeout=60)
        out_store = ray.get(a1.forward.remote(0, 1, (BLOCKS,), via_store, None, 1.0, False), timeout=60)
    finally:
        executor.shutdown()
    assert (out_direct == out_store).all()
    for step, loss in zip((1, 2), executor.history.losses):
        inputs, targets = executor.corpus.train_batch(step, 2, 2)
        assert loss == pytest.approx(reference.train_step(inputs, targets, [list(range(4))] * 2), abs=1e-6)


def test_gloo_recovery_falls_back_cleanly_and_rebuilds_from_the_neighbours(ray_local, caplog):
    """CheckFree under gloo, stage 1 replaced after step 1: recovery asks for the neighbours' blocks by direct
    transport, but gloo cannot form a second group, so the run falls back to the object store (said once); the
    replacement's blocks are still the gradient-weighted sum of its neighbours' and the next step trains."""
    from checkfree_ray.liveness import StageLost
    from checkfree_ray.recovery_rules import gradient_weights, weighing_norm

    spec = tiny_spec("checkfree", warm_standby=True, pipeline={"activation_transport": "gloo"})
    executor = PipelineExecutor(spec)
    sent: list = []
    try:
        executor.start()
        run_steps(executor, 1)
        before = executor.stage_states((BLOCKS,))
        old = list(executor.actors)
        w = gradient_weights(*[weighing_norm(executor.grad_norms[s]) for s in (0, 2)], spec.recovery.epsilon)
        submit = executor.transport.submit
        executor.transport.submit = lambda actor, method, direct, *a, **k: (
            sent.append((method, direct, executor.transport.name)) or submit(actor, method, direct, *a, **k)
        )
        with caplog.at_level(logging.WARNING, logger=transport_module.__name__):
            executor.recovery.recover(2, StageLost([1], "before_step"))
        after = executor.stage_states((BLOCKS,))
        executor.run_step(2)
        members_ok = executor.transport.connected(executor.actors)
    finally:
        executor.shutdown()
    assert executor.actors[1] is not old[1] and executor.transport.name == "object_store" and not members_ok
    assert sent[:2] == [("get_state", True, "object_store")] * 2  # asked for direct, sent through the store
    warnings = [r.getMessage() for r in caplog.records if r.name == transport_module.__name__]
    assert len(warnings) == 1 and "gloo backend cannot" in warnings[0]
    for key, value in after[1].items():
        expected = (w[0] * before[0][key].double() + w[1] * before[2][key].double()).float()
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
    assert executor.history.steps == [1, 2]


@pytest.mark.slow
def test_a_stage_killed_under_gloo_is_recovered_without_hanging(ray_local, tmp_path):
    """A real kill under gloo (checkpoint strategy): Ray may kill the dead stage's transfer peers too, yet the run
    rolls back, falls back to the object store (gloo cannot form a second group) and finishes; no hang."""
    from tests.test_checkfree_phases import fail_at

    spec = tiny_spec(
        "checkpoint",
        warm_standby=True,
        steps=4,
        pipeline={"activation_transport": "gloo"},
        checkpointing={"every": 1},
    )
    executor = PipelineExecutor(spec, checkpoint_uri=str(tmp_path / "ckpt"))
    fail_at(executor, 1, 3, "forward")
    try:
        executor.start()
        run_steps(executor, 4)
    finally:
        executor.shutdown()
    assert executor.history.steps[-1] == 4 and 1 in {f.stage for f in executor.history.failures}
    assert {f.method for f in executor.history.failures} == {"checkpoint"}
    assert executor.transport.name == "object_store"
