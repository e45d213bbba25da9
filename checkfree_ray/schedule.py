"""Learning-rate schedule and throughput arithmetic of a training run (pure functions).

The schedule is the one nanoGPT and most LLM recipes use: linear warmup from 0 to `lr` over `warmup_steps`,
then a cosine from `lr` down to `min_lr` at `decay_steps` (default: the run's last step), flat after that.
A stage's learning rate is its own base rate (`optim.lr`, times `recovery.lr_scale` for a rebuilt stage)
times `lr_factor(spec, step)`, so the schedule and CheckFree's rescaling compose.
"""

from __future__ import annotations

import math

from schemas.train import OptimSpec, TrainSpec

# Peak dense bf16 FLOP/s per device by torch.cuda.get_device_name() substring (no sparsity); CPUs: none.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def scheduled_lr(optim: OptimSpec, step: int, total_steps: int) -> float:
    """Learning rate of `step` (1-based) under `optim.schedule`."""
    if optim.schedule == "constant":
        return optim.lr
    if optim.warmup_steps and step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    decay_end = optim.decay_steps or total_steps
    if step >= decay_end:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_end - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def lr_factor(spec: TrainSpec, step: int) -> float:
    """The schedule's multiplier of each stage's base learning rate at `step`."""
    return scheduled_lr(spec.optim, step, spec.steps) / spec.optim.lr


def model_flops_per_token(parameters: int) -> float:
    """Training FLOPs per token, 6·N (forward 2N, backward 4N; attention's T-dependent term left out)."""
    return 6.0 * parameters


def mfu(tokens_per_s: float, parameters: int, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved 6·N FLOP/s over the peak of all devices; None without a known peak."""
    if not peak_flops or devices <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * model_flops_per_token(parameters) / (peak_flops * devices)


def device_peak_flops(spec: TrainSpec, device_name: str | None) -> float | None:
    """`pipeline.peak_flops` from the spec, else the table's entry for a GPU's name; None on CPU or unknown."""
    if spec.pipeline.peak_flops is not None:
        return spec.pipeline.peak_flops
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)
