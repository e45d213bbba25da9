"""The training loop both recipes share: data batches, AdamW with warmup, online EMA, checkpoints every
`checkpoint_every` steps, a resumable state file, progress lines and sample grids.

Files under `out` (a local path or s3:// URI):
  checkpoints/ckpt_{step:06d}.safetensors  raw weights, metadata {"step", "kind", "model_kwargs", ...}
  ema.safetensors                          the online EMA at the last checkpoint (same keys)
  posthoc_ema/phema-{sigma_rel}-{step}.safetensors   power-function EMA snapshots (EDM2) at each checkpoint,
                                           metadata {"step", "gamma", "sigma_rel"}: a search rebuilds any EMA from them
  train_state.pt                           model, EMA, optimizer, step and RNG states (resume point)
  samples.png, samples_last.png            sample grids of the EMA and of the last weights
  summary.json                             steps, wall time, steps/s, final loss, files
The state file is written after the checkpoint it belongs to, so a run killed at any moment resumes
from the last complete checkpoint and, with one torch thread, ends bit-identical to an unbroken run.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lcsc_ray import posthoc_ema
from lcsc_ray.recipes import checkpoints as ckpt
from lcsc_ray.recipes.data import mnist_split
from rayops import storage
from rayops.artifacts import write_json
from rayops.progress import ProgressLine
from schemas.errors import CheckpointError

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Settings shared by the DDPM and consistency recipes."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field(default="outputs/mnist-ddpm", description="Output directory: local path or s3:// URI.")
    steps: int = Field(
        default=2500, ge=1, description="Total optimizer steps (a resumed run stops here too)."
    )
    batch_size: int = Field(default=64, ge=1, description="Images per step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="After warm-up: constant (the LCSC setting), or cosine to min_lr_ratio.",
    )
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final lr / peak lr of the cosine schedule."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
    checkpoint_every: int = Field(default=100, ge=1, description="Save a checkpoint every this many steps.")
    ema_decay: float = Field(
        default=0.999, ge=0, lt=1, description="Online EMA decay (warmed up as (1+n)/(10+n))."
    )
    posthoc_ema_sigma_rels: list[float] = Field(
        default_factory=lambda: list(posthoc_ema.DEFAULT_SIGMA_RELS),
        description="sigma_rel of each power-function EMA (EDM2) whose snapshot is saved beside every checkpoint "
        "under `posthoc_ema/`; a search's `posthoc_ema` block rebuilds any EMA from them. [] saves none.",
    )
    seed: int = Field(default=0, description="Seed of the initial weights, data order, noise and timesteps.")
    model: dict = Field(default_factory=dict, description="U-Net keyword arguments (see UNetConfig).")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads. None: the CPUs Ray assigned to this task (e.g. `train_on_ray(num_cpus=2)`), "
        "or outside a Ray task this process's torch setting (OMP_NUM_THREADS).",
    )
    grid_samples: int = Field(default=64, ge=0, description="Samples in each PNG grid (0: no grids).")
    grid_nfe: int = Field(default=20, ge=1, description="Sampler steps for the PNG grids.")
    progress_interval_s: float = Field(default=5.0, gt=0, description="Seconds between progress lines.")


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after` to simulate a run killed right after a step (tests, demos)."""


@dataclass
class Recipe:
    """What differs between recipes: the trained model, its loss, a sampler, extra state to resume."""

    kind: str
    model: nn.Module
    loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
    sample: Callable[[nn.Module, int, int, int, int], torch.Tensor]
    model_kwargs: dict
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)  # saved in the training state
    after_step: Callable[[nn.Module, int], None] | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)


def ray_task_cpus() -> float | None:
    """The CPUs Ray assigned to the task or actor running this code, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None  # the driver: nothing was assigned to it
    return float(context.get_assigned_resources().get("CPU", 0.0))


def training_threads(configured: int | None, assigned_cpus: float | None, process_threads: int) -> int:
    """torch threads of a training run: the configured number; else the whole CPUs Ray assigned to the task
    (at least 1); else the process's own setting (`process_threads`, what OMP_NUM_THREADS gave torch)."""
    if configured is not None:
        return configured
    if assigned_cpus is not None:
        return max(1, int(assigned_cpus))
    return max(1, process_threads)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after `step` updates, warmed up as min(decay, (1+n)/(10+n)) so the initial weights fade."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def image_grid_png(images: torch.Tensor, columns: int = 8) -> bytes:
    """A PNG of images (N, 1, H, W) in [-1, 1] tiled `columns` wide with 2-pixel gaps."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = max(1, math.ceil(n / columns))
    canvas = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2), dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = pixels[i]
    buffer = io.BytesIO()
    Image.fromarray(canvas).resize((canvas.shape[1] * 3, canvas.shape[0] * 3), Image.NEAREST).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _metadata(recipe: Recipe, config: TrainConfig, step: int, weights: str) -> dict[str, str]:
    return {
        "step": str(step),
        "kind": recipe.kind,
        "weights": weights,
        "model_kwargs": json.dumps(recipe.model_kwargs),
        "config": config.model_dump_json(),
        "torch": torch.__version__,
        **recipe.extra_metadata,
    }


def _save(
    recipe: Recipe,
    config: TrainConfig,
    step: int,
    ema: nn.Module,
    optimizer,
    generator,
    power_ema: posthoc_ema.PowerEMA | None = None,
) -> None:
    out = config.out
    for sigma_rel, gamma, state_dict in power_ema.snapshots() if power_ema else []:
        ckpt.save_weights(
            storage.join(out, posthoc_ema.SNAPSHOT_FOLDER, posthoc_ema.snapshot_name(sigma_rel, step)),
            state_dict,
            {
                **_metadata(recipe, config, step, "power-ema"),
                **posthoc_ema.snapshot_metadata(sigma_rel, gamma, step),
            },
        )
    ckpt.save_weights(
        storage.join(out, "checkpoints", ckpt.checkpoint_name(step)),
        recipe.model.state_dict(),
        _metadata(recipe, config, step, "model"),
    )
    ckpt.save_weights(
        storage.join(out, "ema.safetensors"),
        ema.state_dict(),
        _metadata(recipe, config, step, f"ema@{config.ema_decay}"),
    )
    state = {
        "step": step,
        "model": recipe.model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "config": config.model_dump_json(),
        "extra": {name: module.state_dict() for name, module in recipe.extra_modules.items()},
        "power_ema": power_ema.state_dict() if power_ema else None,
    }
    ckpt.save_training_state(storage.join(out, "train_state.pt"), state)  # last: the commit point


def _resume(
    recipe: Recipe,
    config: TrainConfig,
    ema: nn.Module,
    optimizer,
    generator,
    power_ema: posthoc_ema.PowerEMA | None = None,
) -> int:
    state_uri = storage.join(config.out, "train_state.pt")
    if not storage.exists(state_uri):
        return 0
    state = ckpt.load_training_state(state_uri)
    saved_model = json.loads(state["config"])["model"]
    if saved_model != config.model:
        raise CheckpointError(
            f"{state_uri} was written with model={saved_model}, but this run asks for model={config.model}; "
            "use the same model settings to resume, or a new `out` to start afresh"
        )
    recipe.model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    for name, module in recipe.extra_modules.items():
        module.load_state_dict(state["extra"][name])
    if power_ema is not None and state.get("power_ema"):
        power_ema.load_state_dict(state["power_ema"])
    log.info("resuming %s from step %d (%s)", recipe.kind, state["step"], state_uri)
    return int(state["step"])


def run_training(recipe: Recipe, config: TrainConfig, stop_after: int | None = None) -> dict:
    """Train `recipe.model` to `config.steps`, resuming from `out/train_state.pt` when it exists.
    `stop_after` raises TrainingInterrupted after that step (a simulated kill). Returns the summary."""
    threads = training_threads(config.torch_threads, ray_task_cpus(), torch.get_num_threads())
    torch.set_num_threads(threads)
    images, _ = mnist_split("train")  # (4000, 1, 28, 28) in [-1, 1]
    model = recipe.model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    power_ema = (
        posthoc_ema.PowerEMA(model, config.posthoc_ema_sigma_rels) if config.posthoc_ema_sigma_rels else None
    )
    start_step = step = _resume(recipe, config, ema, optimizer, generator, power_ema)
    progress = ProgressLine(f"train-{recipe.kind}", total=config.steps, interval_s=config.progress_interval_s)
    progress.update(done=step, force=True, resumed_from=step)
    started, cpu_started, loss_avg = time.monotonic(), time.process_time(), None
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch = images[torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)]
        loss = recipe.loss(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        update_ema(ema, model, ema_decay_at(step, config.ema_decay))
        if power_ema is not None:
            power_ema.update(model, step)  # EDM2 power-function EMAs, snapshot at each checkpoint
        if recipe.after_step is not None:
            recipe.after_step(model, step)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save(recipe, config, step, ema, optimizer, generator, power_ema)
        rate = (step - start_step) / max(1e-9, time.monotonic() - started)
        progress.update(done=step, loss=loss_avg, steps_per_s=rate)
        if stop_after is not None and step >= stop_after and step < config.steps:
            raise TrainingInterrupted(f"stopped after step {step} (stop_after={stop_after})")
    wall_s = time.monotonic() - started
    files = _write_grids(recipe, config, ema)
    cpu_s = time.process_time() - cpu_started  # the cores are shared: CPU time says what the run cost
    summary = {
        "kind": recipe.kind,
        "steps": step,
        "resumed_from": start_step,
        "wall_s": round(wall_s, 2),
        "cpu_s": round(cpu_s, 2),
        "torch_threads": threads,
        "steps_per_s": round((step - start_step) / max(wall_s, 1e-9), 3),
        "final_loss": loss_avg,
        "out": config.out,
        "num_checkpoints": len(ckpt.list_checkpoints(storage.join(config.out, "checkpoints"))),
        "files": files,
    }
    write_json(storage.join(config.out, "summary.json"), summary)
    progress.emit(f"train-{recipe.kind} done: {json.dumps(summary)}")
    return summary


def _write_grids(recipe: Recipe, config: TrainConfig, ema: nn.Module) -> dict[str, str]:
    if config.grid_samples == 0:
        return {}
    files = {}
    for name, module in (("samples.png", ema), ("samples_last.png", recipe.model)):
        images = recipe.sample(module.eval(), config.grid_samples, 0, config.grid_nfe, 250)
        files[name] = storage.join(config.out, name)
        storage.write_bytes(files[name], image_grid_png(images))
    recipe.model.train()
    return files
