"""Entry points of the recipes: `train_ddpm`, `train_consistency` (in-process) and `train_on_ray`
(the same function as a Ray task, so it runs on any node of a cluster and is retried, resuming from its
last checkpoint, when its worker dies)."""

from __future__ import annotations

import copy
import functools
import json
import os

import torch
from pydantic import Field
from torch import nn

from lcsc_ray.recipes import checkpoints as ckpt
from lcsc_ray.recipes.consistency import (
    DiffusersDenoiser,
    build_consistency_model,
    consistency_sample,
    distillation_loss,
    timestep_grid,
)
from lcsc_ray.recipes.diffusion import (
    ddpm_scheduler,
    diffusers_ddim_sample,
    diffusers_loss,
)
from lcsc_ray.recipes.training import Recipe, TrainConfig, run_training, update_ema
from lcsc_ray.recipes.unet import DIFFUSERS_UNET, UNet, UNetConfig, build_diffusers_unet, build_unet
from rayops import storage


class DDPMTrainConfig(TrainConfig):
    """DDPM training on the MNIST train split: diffusers' UNet2DModel (`model`: its kwargs over
    `unet.DIFFUSERS_UNET`) and DDPMScheduler, saved as diffusers checkpoints."""


def make_unet(model_kwargs: dict, seed: int) -> UNet:
    """A U-Net initialised from `seed` (training starts here; `build_unet` is the seed-0 skeleton)."""
    kwargs = dict(model_kwargs)
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    config = UNetConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config)


def train_ddpm(config: DDPMTrainConfig | dict, stop_after: int | None = None) -> dict:
    """Train the MNIST DDPM (diffusers UNet2DModel, DDPMScheduler with v-prediction) in this process; resumes
    from `config.out` when a run was interrupted. Checkpoints are `checkpoint-N/unet` and `checkpoint-N/unet_ema`
    folders, as diffusers' training scripts save them. Returns the summary (steps, wall_s, steps_per_s, ...)."""
    config = DDPMTrainConfig.model_validate(config)
    model = build_diffusers_unet(seed=config.seed, **config.model)
    scheduler = ddpm_scheduler()
    model.lcsc_scheduler_config = dict(scheduler.config)  # what the DDIM sampler of the grids reads
    recipe = Recipe(
        kind="ddpm",
        model=model,
        loss=functools.partial(diffusers_loss, scheduler=scheduler),
        sample=diffusers_ddim_sample,
        model_kwargs=dict(config.model),
        checkpoint_format="diffusers",
        scheduler_config=dict(scheduler.config),
    )
    return run_training(recipe, config, stop_after=stop_after)


class ConsistencyTrainConfig(TrainConfig):
    """Consistency distillation from a trained DDPM (defaults: about 4 minutes on one CPU core)."""

    out: str = Field(default="outputs/mnist-cm", description="Output directory: local path or s3:// URI.")
    teacher_uri: str = Field(default="outputs/mnist-ddpm/unet_ema",
                             description="The DDPM teacher: a diffusers model folder (the DDPM recipe's final EMA "
                             "by default) or a recipe .safetensors U-Net.")
    steps: int = Field(default=1000, ge=1, description="Total optimizer steps.")
    lr: float = Field(default=2e-4, gt=0, description="Peak AdamW learning rate (the student starts as the teacher).")
    warmup_steps: int = Field(default=50, ge=0, description="Linear learning-rate warm-up steps.")
    checkpoint_every: int = Field(default=40, ge=1, description="Save a checkpoint every this many steps.")
    ema_decay: float = Field(default=0.995, ge=0, lt=1, description="Online EMA decay of the saved EMA weights.")
    target_ema_decay: float = Field(default=0.95, ge=0, lt=1,
                                    description="mu: EMA decay of the target network (Song et al. 2023, Alg. 2).")
    grid_points: int = Field(default=50, ge=2, description="N: timestep grid points the teacher's ODE is split into.")
    grid_nfe: int = Field(default=1, ge=1, description="Sampler steps for the PNG grids.")


def load_teacher(uri: str) -> nn.Module:
    """The DDPM saved at `uri` (frozen, eval mode): a diffusers folder (`unet_ema/`, `checkpoint-N/unet/`) as a
    `DiffusersDenoiser`, or a recipe .safetensors U-Net built from its model_kwargs."""
    if not uri.endswith(".safetensors"):
        from diffusers import UNet2DModel

        config = json.loads(storage.read_bytes(storage.join(uri, "config.json")))
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        state_dict, _ = ckpt.load_weights(storage.join(uri, "diffusion_pytorch_model.safetensors"))
        unet = ckpt.load_into(UNet2DModel.from_config(kwargs), state_dict, uri)
        teacher = DiffusersDenoiser(unet)
        teacher.model_kwargs = {"diffusers": _diffusers_kwargs(unet)}
        return teacher.eval().requires_grad_(False)
    state_dict, metadata = ckpt.load_weights(uri)
    teacher = build_unet(**ckpt.model_kwargs_of(metadata, uri))
    teacher.model_kwargs = teacher.config.to_kwargs()
    return ckpt.load_into(teacher, state_dict, uri).eval().requires_grad_(False)


def _diffusers_kwargs(unet: nn.Module) -> dict:
    """The kwargs over `DIFFUSERS_UNET` that rebuild `unet` (JSON-serialisable)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items()
            if k in DIFFUSERS_UNET and not k.startswith("_")}


def train_consistency(config: ConsistencyTrainConfig | dict, stop_after: int | None = None) -> dict:
    """Distil the DDPM at `config.teacher_uri` into a consistency model, in this process; resumes from
    `config.out` when a run was interrupted. Returns the summary."""
    config = ConsistencyTrainConfig.model_validate(config)
    teacher = load_teacher(config.teacher_uri)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = build_consistency_model(**teacher.model_kwargs)
    student.unet.load_state_dict(teacher.state_dict())  # CD starts from the teacher (Song et al. 2023, Sec. 6)
    target = copy.deepcopy(student).requires_grad_(False)
    grid = timestep_grid(config.grid_points, teacher.config.num_timesteps)

    def update_target(model: nn.Module, step: int) -> None:
        update_ema(target, model, config.target_ema_decay)

    recipe = Recipe(
        kind="consistency",
        model=student,
        loss=functools.partial(distillation_loss, teacher=teacher, target=target, grid=grid),
        sample=consistency_sample,
        model_kwargs=teacher.model_kwargs,
        extra_modules={"target": target},
        after_step=update_target,
        extra_metadata={"teacher_uri": config.teacher_uri},
    )
    return run_training(recipe, config, stop_after=stop_after)


TRAINERS = {"ddpm": (train_ddpm, DDPMTrainConfig), "consistency": (train_consistency, ConsistencyTrainConfig)}


def _absolute_local(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(storage.parse_uri(uri).key)


def train_on_ray(kind: str, config: TrainConfig | dict, ray_spec=None, num_cpus: float = 1.0,
                 max_retries: int = 3) -> dict:
    """Run a recipe's training as one Ray task (local Ray, $RAY_ADDRESS or `ray_spec.address`).
    A task whose worker dies is retried up to `max_retries` times and resumes from its last checkpoint."""
    import ray

    from rayops.session import ray_session

    train_fn, config_cls = TRAINERS[kind]
    config = config_cls.model_validate(config)
    config = config.model_copy(update={"out": _absolute_local(config.out)})
    with ray_session(ray_spec):
        task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(train_fn)
        return ray.get(task.remote(config.model_dump()))
