"""Learning-rate schedule, AdamW decay groups, MFU arithmetic, and the pipeline under a schedule."""

from __future__ import annotations

import math

import pytest
import torch

from checkfree_ray.lr_schedule import lr_factor, scheduled_lr
from checkfree_ray.mfu import device_peak_flops, mfu
from checkfree_ray.model import ModelConfig, ReferenceTrainer, build_parts
from checkfree_ray.recovery_rules import micro_batch_order
from checkfree_ray.stage import StageWorker, initial_stage_state
from schemas.train import LlamaSpec, OptimSpec, TrainSpec


def test_warmup_then_cosine_to_min_lr():
    """Warmup is linear from lr/warmup, the cosine passes the midpoint at half its span and ends at min_lr."""
    optim = OptimSpec(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr=1e-4)
    assert scheduled_lr(optim, 1, 110) == pytest.approx(1e-4)
    assert scheduled_lr(optim, 10, 110) == pytest.approx(1e-3)
    assert scheduled_lr(optim, 60, 110) == pytest.approx((1e-3 + 1e-4) / 2)
    step = 85  # independent formula: min + (max - min) * (1 + cos(pi * t)) / 2
    expected = 1e-4 + (1e-3 - 1e-4) * (1 + math.cos(math.pi * 75 / 100)) / 2
    assert scheduled_lr(optim, step, 110) == pytest.approx(expected, rel=1e-12)
    assert scheduled_lr(optim, 110, 110) == scheduled_lr(optim, 500, 110) == 1e-4
    assert scheduled_lr(OptimSpec(lr=2e-3), 7, 10) == 2e-3  # constant stays the paper's default
    with pytest.raises(ValueError, match="min_lr"):
        OptimSpec(lr=1e-4, min_lr=1e-3)


def test_adamw_decays_matrices_but_not_norms_or_embedding(ray_local):
    """With zero gradients one AdamW step shrinks only the matrices by lr*wd; norms and the embedding stay."""
    cfg = ModelConfig.from_spec(LlamaSpec(d_model=16, n_layers=2, n_heads=2, seq_len=8), 2)
    worker = StageWorker(cfg, grad_clip=1.0, weight_decay=0.5)
    worker.configure(0, 0.1, initial_stage_state(build_parts(cfg, 0), 0))
    before = {n: p.detach().clone() for n, p in worker._named_parameters()}
    for _, p in worker._named_parameters():
        p.grad = torch.zeros_like(p)
    worker.step(lr_factor=0.5)  # effective lr 0.05: decay factor 1 - 0.05 * 0.5
    after = dict(worker._named_parameters())
    assert torch.equal(after["embed/tok.weight"], before["embed/tok.weight"])
    assert torch.equal(after["blocks/blocks.0.attn_norm.weight"], before["blocks/blocks.0.attn_norm.weight"])
    w = "blocks/blocks.0.ffn.w2.weight"
    torch.testing.assert_close(after[w].detach(), before[w] * (1 - 0.05 * 0.5))
    assert worker.lr() == 0.1  # the base rate; the schedule's factor applies per step


def test_mfu_is_six_n_flops_per_token_over_peak():
    """MFU = tokens/s * 6N / (peak * devices); parameter_count equals the built model's numel; None on CPU."""
    cfg = ModelConfig.from_spec(LlamaSpec(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=8), 2)
    parts = build_parts(cfg, 0)
    numel = sum(p.numel() for m in (parts.embedding, *parts.stages, parts.head) for p in m.parameters())
    assert cfg.parameter_count() == numel
    assert mfu(1000.0, numel, 1e12, 2) == pytest.approx(1000 * 6 * numel / 2e12)
    spec = TrainSpec()
    assert mfu(1000.0, numel, device_peak_flops(spec, None), 4) is None
    assert device_peak_flops(spec, "NVIDIA H200") == 989e12
    assert device_peak_flops(TrainSpec(pipeline={"peak_flops": 5e13}), "NVIDIA H200") == 5e13


@pytest.mark.timeout(180)
def test_pipeline_follows_the_schedule_like_one_process(ray_local):
    """Under warmup + cosine with weight decay the pipeline's losses equal single-process training's."""
    from checkfree_ray.executor import PipelineExecutor

    spec = TrainSpec.model_validate(
        {
            "steps": 4,
            "eval_every": 4,
            "eval_batches": 1,
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "seq_len": 16},
            "pipeline": {
                "num_stages": 2,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "optim": {
                "lr": 3e-2,
                "schedule": "cosine",
                "warmup_steps": 2,
                "min_lr": 3e-3,
                "weight_decay": 0.1,
            },
            "recovery": {"strategy": "none"},
        }
    )
    executor = PipelineExecutor(spec)
    executor.start()
    try:
        reference = ReferenceTrainer(executor.cfg, spec.seed, spec.optim.lr, weight_decay=0.1)
        constant = ReferenceTrainer(executor.cfg, spec.seed, spec.optim.lr, weight_decay=0.1)
        for step in range(1, 5):
            executor.run_step(step)
            x, y = executor.corpus.train_batch(step, 2, 2)
            orders = [micro_batch_order("none", 2, m) for m in range(2)]
            expected = reference.train_step(x, y, orders, lr_factor=lr_factor(spec, step))
            unscheduled = constant.train_step(x, y, orders)
            assert executor.history.losses[-1] == pytest.approx(expected, abs=1e-6)
        assert abs(unscheduled - expected) > 1e-4  # the schedule changed the trajectory
    finally:
        executor.shutdown()
