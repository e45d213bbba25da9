"""Learning-rate schedule of a training run (pure functions).

The schedule is the one nanoGPT and most LLM recipes use: linear warmup from 0 to `lr` over `warmup_steps`,
then a cosine from `lr` down to `min_lr` at `decay_steps` (default: the run's last step), flat after that.
A stage's learning rate is its own base rate (`optim.lr`, times `recovery.lr_scale` for a rebuilt stage)
times `lr_factor(spec, step)`, so the schedule and CheckFree's rescaling compose.
"""

from __future__ import annotations

import math

from schemas.train import OptimSpec, TrainSpec


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
