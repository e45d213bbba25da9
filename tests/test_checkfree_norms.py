"""The gradient norms CheckFree weighs neighbours with: what is clipped is what is measured; per-stage or global."""

from __future__ import annotations

import math

import pytest
import torch

from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.recovery_rules import at_clip, gradient_weights, plan_recovery, weighing_norm
from checkfree_ray.stage import StageWorker
from schemas.train import LlamaSpec
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(180)


def test_recipe_weights_match_a_hand_computation():
    """Post-clip norms 1.0 (clipped from 3.2) and 0.25, eps 1e-4: weights 1.0001/1.2502 and 0.2501/1.2502."""
    norms = [
        {"stage": 1.0, "stage_pre_clip": 3.2, "blocks": 0.9, "blocks_pre_clip": 2.88},
        {"stage": 0.0},
        {"stage": 0.25, "stage_pre_clip": 0.25, "blocks": 0.2, "blocks_pre_clip": 0.2},
    ]
    post = [weighing_norm(n) for n in norms]
    plan = plan_recovery("checkfree", {1}, 4, "weighted", post + [0.0], 1e-4)
    assert plan.rebuilds[0].sources == (0, 2)
    assert plan.rebuilds[0].weights == pytest.approx((1.0001 / 1.2502, 0.2501 / 1.2502), abs=1e-12)
    pre = [weighing_norm(n, "stage", "pre_clip") for n in norms]
    assert pre[0] == 3.2 and gradient_weights(pre[0], pre[2], 1e-4)[0] == pytest.approx(3.2001 / 3.4502)
    assert weighing_norm(norms[0], "blocks") == 0.9
    assert at_clip(norms[0], 1.0) and not at_clip(norms[2], 1.0)
    both = plan_recovery("checkfree", {1}, 4, "weighted", [1.0, 0.0, 1.0, 0.0], 1e-4).rebuilds[0].weights
    assert both == (0.5, 0.5)  # two neighbours at the clip: the plain average
    assert plan_recovery("checkfree", {1}, 4, "copy", post + [0.0], 1e-4).rebuilds[0].sources == (0,)


def _first_stage_with_gradient(clip: float) -> tuple[StageWorker, float, float]:
    cfg = ModelConfig.from_spec(LlamaSpec(d_model=32, n_layers=4, n_heads=2, seq_len=16), 4)
    from checkfree_ray.model import build_parts
    from checkfree_ray.stage import initial_stage_state

    worker = StageWorker(cfg, grad_clip=clip, weight_decay=0.0)
    worker.configure(0, 1e-3, initial_stage_state(build_parts(cfg, 0), 0))
    tokens = torch.randint(0, 256, (2, 16))
    out = worker.forward(0, 0, ("embed", "blocks"), tokens.numpy())
    worker.backward(0, 0, torch.ones(out.shape).numpy() * 0.3)
    named = worker._named_parameters()
    every = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in named))
    blocks = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for n, p in named if n.startswith("blocks")))
    return worker, every, blocks


def test_stage_clips_and_measures_the_same_parameters_embedding_included():
    """Stage 0's reported norms cover its embedding too (as its clip does): pre = independent float64 norm over all
    its parameters, post = min(pre, clip) up to torch's 1e-6 guard."""
    worker, every, blocks = _first_stage_with_gradient(clip=0.05)
    assert every > blocks * 1.0001  # the embedding has a gradient of its own
    norms = worker.step()
    assert norms["stage_pre_clip"] == pytest.approx(every, rel=1e-5)
    assert norms["blocks_pre_clip"] == pytest.approx(blocks, rel=1e-5)
    assert norms["stage"] == pytest.approx(0.05, rel=1e-4)  # clipped to the clip, measured after
    assert norms["blocks"] == pytest.approx(blocks * 0.05 / every, rel=1e-4)


@pytest.mark.slow
def test_global_clip_equals_single_process_training_with_one_norm(ray_local):
    """optim.clip 'global': every stage scales by the one coefficient of the whole model's norm; losses equal a
    single process that clips all parameters together (a per-stage clip gives different losses)."""
    from checkfree_ray.executor import PipelineExecutor

    spec = tiny_spec("checkfree", optim={"lr": 3e-3, "grad_clip": 0.05, "clip": "global"})
    executor = PipelineExecutor(spec)
    try:
        executor.start()
        run_steps(executor, 3)
    finally:
        executor.shutdown()
    reference = ReferenceTrainer(
        ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr, grad_clip=0.05
    )
    expected = []
    for step in range(1, 4):
        inputs, targets = executor.corpus.train_batch(step, 2, 2)
        total = 0.0
        for mb in range(2):
            loss = reference.forward_loss(inputs[mb], targets[mb], [0, 1, 2, 3])
            (loss / 2).backward()
            total += loss.item() / 2
        expected.append(total)
        params = [p for group in reference.groups for p in group]
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        for optimizer in reference.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert executor.history.losses == pytest.approx(expected, abs=1e-6)
