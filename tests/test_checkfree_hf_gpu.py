"""CheckFree stages on GPUs (skipped without CUDA; `benchmarks/gpu_check.sh` runs them where a GPU is)."""

from __future__ import annotations

import math

import pytest
import torch

from checkfree_ray.model import ReferenceTrainer
from checkfree_ray.recovery_rules import micro_batch_order
from schemas.train import TrainSpec

pytestmark = pytest.mark.timeout(300)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_spec(precision: str, **extra) -> TrainSpec:
    """Two stages sharing one GPU (0.5 each), a d=64 model, 2 micro-batches of 2x32 bytes."""
    return TrainSpec.model_validate(
        {
            "steps": 4,
            "eval_every": 4,
            "eval_batches": 1,
            "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "seq_len": 32},
            "pipeline": {
                "num_stages": 2,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.5,
                "num_gpus_per_stage": 0.5,
                "precision": precision,
                "warm_standby": False,
            },
            "optim": {"lr": 3e-3},
            **extra,
        }
    )


@needs_gpu
def test_fp32_gpu_stages_match_cpu_training(ray_local):
    """float32 stages on the GPU give the single-process CPU losses to 1e-4 and report a CUDA device."""
    import ray

    from checkfree_ray.executor import PipelineExecutor

    spec = gpu_spec("fp32", recovery={"strategy": "none"})
    executor = PipelineExecutor(spec)
    executor.start()
    try:
        assert ray.get(executor.actors[0].ping.remote(), timeout=60)["device"].startswith("cuda")
        reference = ReferenceTrainer(executor.cfg, spec.seed, spec.optim.lr)
        for step in range(1, 5):
            executor.run_step(step)
            x, y = executor.corpus.train_batch(step, 2, 2)
            expected = reference.train_step(x, y, [micro_batch_order("none", 2, m) for m in range(2)])
            assert executor.history.losses[-1] == pytest.approx(expected, abs=1e-4)
    finally:
        executor.shutdown()


@needs_gpu
def test_bf16_gpu_run_with_a_kill_recovers(ray_local, tmp_path):
    """A bf16 run on GPU stages with a stage killed recovers it and keeps finite losses near the fp32 ones."""
    from checkfree_ray import run_training

    spec = gpu_spec(
        "bf16",
        recovery={"strategy": "checkfree+"},
        failures={"schedule": [[3, 1]]},
        output={"uri": str(tmp_path / "run")},
    )
    result = run_training(spec, progress=False)
    assert [(f.step, f.stage) for f in result.failures] == [(3, 1)]
    assert all(math.isfinite(v) for v in result.losses) and result.mfu is not None and result.mfu > 0
    assert abs(result.losses[0] - math.log(256)) < 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_gpu_stages_without_a_gpu_are_refused_by_field(ray_local):
    """Without GPUs in Ray the pipeline is refused before it starts, naming the GPUs asked; a stage process
    whose torch has no CUDA names pipeline.num_gpus_per_stage."""
    from checkfree_ray.executor import PipelineExecutor
    from checkfree_ray.model import ModelConfig
    from checkfree_ray.stage import StageWorker
    from schemas.errors import InfeasibleResourcesError

    spec = gpu_spec("bf16")
    executor = PipelineExecutor(spec)
    with pytest.raises(InfeasibleResourcesError, match="GPU"):
        executor.start()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="pipeline.num_gpus_per_stage"):
        StageWorker(ModelConfig.from_train_spec(spec), 1.0, 0.0, num_gpus=0.5)
