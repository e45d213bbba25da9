"""Entry points of the recipes: `train_ddpm`, `train_consistency` (in-process) and `train_on_ray`
(the same function as a Ray task, so it runs on any node of a cluster and is retried, resuming from its
last checkpoint, when its worker dies)."""

from __future__ import annotations

import copy
import functools
import os

import torch
from pydantic import Field
from torch import nn

from lcsc_ray.recipes import checkpoints as ckpt
from lcsc_ray.recipes.consistency import (
    ConsistencyModel,
    consistency_sample,
    distillation_loss,
    timestep_grid,
)
from lcsc_ray.recipes.diffusion import ddim_sample, diffusion_loss, noise_scheduler
from lcsc_ray.recipes.training import Recipe, TrainConfig, run_training, update_ema
from lcsc_ray.recipes.unet import UNet, UNetConfig, build_unet
from rayops import storage


class DDPMTrainConfig(TrainConfig):
    """DDPM training on the MNIST train split (defaults: about 6 minutes on one CPU core)."""


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
    """Train the MNIST DDPM in this process; resumes from `config.out` when a run was interrupted.
    Returns the summary (steps, wall_s, steps_per_s, final_loss, files)."""
    config = DDPMTrainConfig.model_validate(config)
    model = make_unet(config.model, config.seed)
    unet_config = model.config
    scheduler = noise_scheduler(unet_config.schedule, unet_config.num_timesteps, unet_config.prediction)
    recipe = Recipe(
        kind="ddpm",
        model=model,
        loss=functools.partial(diffusion_loss, scheduler=scheduler),
        sample=ddim_sample,
        model_kwargs=unet_config.to_kwargs(),
    )
    return run_training(recipe, config, stop_after=stop_after)


class ConsistencyTrainConfig(TrainConfig):
    """Consistency distillation from a trained DDPM (defaults: about 4 minutes on one CPU core)."""

    out: str = Field(default="outputs/mnist-cm", description="Output directory: local path or s3:// URI.")
    teacher_uri: str = Field(
        default="outputs/mnist-ddpm/ema.safetensors",
        description="The DDPM teacher's weights (a recipe checkpoint; its EMA by default).",
    )
    steps: int = Field(default=1000, ge=1, description="Total optimizer steps.")
    lr: float = Field(
        default=2e-4, gt=0, description="Peak AdamW learning rate (the student starts as the teacher)."
    )
    warmup_steps: int = Field(default=50, ge=0, description="Linear learning-rate warm-up steps.")
    checkpoint_every: int = Field(default=40, ge=1, description="Save a checkpoint every this many steps.")
    ema_decay: float = Field(
        default=0.995, ge=0, lt=1, description="Online EMA decay of the saved EMA weights."
    )
    target_ema_decay: float = Field(
        default=0.95,
        ge=0,
        lt=1,
        description="mu: EMA decay of the target network (Song et al. 2023, Alg. 2).",
    )
    grid_points: int = Field(
        default=50, ge=2, description="N: timestep grid points the teacher's ODE is split into."
    )
    grid_nfe: int = Field(default=1, ge=1, description="Sampler steps for the PNG grids.")


def load_teacher(uri: str) -> UNet:
    """The DDPM U-Net saved at `uri` (frozen, eval mode), built from the checkpoint's model_kwargs."""
    state_dict, metadata = ckpt.load_weights(uri)
    teacher = build_unet(**ckpt.model_kwargs_of(metadata, uri))
    return ckpt.load_into(teacher, state_dict, uri).eval().requires_grad_(False)


def train_consistency(config: ConsistencyTrainConfig | dict, stop_after: int | None = None) -> dict:
    """Distil the DDPM at `config.teacher_uri` into a consistency model, in this process; resumes from
    `config.out` when a run was interrupted. Returns the summary."""
    config = ConsistencyTrainConfig.model_validate(config)
    teacher = load_teacher(config.teacher_uri)
    student = ConsistencyModel(make_unet(teacher.config.to_kwargs(), config.seed))
    student.unet.load_state_dict(
        teacher.state_dict()
    )  # CD starts from the teacher (Song et al. 2023, Sec. 6)
    target = copy.deepcopy(student).requires_grad_(False)
    grid = timestep_grid(config.grid_points, teacher.config.num_timesteps)

    def update_target(model: nn.Module, step: int) -> None:
        update_ema(target, model, config.target_ema_decay)

    recipe = Recipe(
        kind="consistency",
        model=student,
        loss=functools.partial(distillation_loss, teacher=teacher, target=target, grid=grid),
        sample=consistency_sample,
        model_kwargs=teacher.config.to_kwargs(),
        extra_modules={"target": target},
        after_step=update_target,
        extra_metadata={"teacher_uri": config.teacher_uri},
    )
    return run_training(recipe, config, stop_after=stop_after)


TRAINERS = {"ddpm": (train_ddpm, DDPMTrainConfig), "consistency": (train_consistency, ConsistencyTrainConfig)}


# OpenMP threads that sleep at a barrier instead of spinning: with 2 threads on cores other processes also
# use, spinning made a training step 3-8x slower than 1 thread; sleeping kept it within 1.1-1.4x (measured at
# load average 3-23 on 2 cores). An OMP_WAIT_POLICY set in the environment wins.
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


def training_env(num_cpus: float) -> dict[str, str]:
    """Environment variables of the training task's worker: OpenMP's wait policy when it runs >1 thread."""
    if num_cpus < 2:
        return {}
    return {WAIT_POLICY_ENV: os.environ.get(WAIT_POLICY_ENV, DEFAULT_WAIT_POLICY)}


def _absolute_local(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(storage.parse_uri(uri).key)


def train_on_ray(
    kind: str, config: TrainConfig | dict, ray_spec=None, num_cpus: float = 1.0, max_retries: int = 3
) -> dict:
    """Run a recipe's training as one Ray task (local Ray, $RAY_ADDRESS or `ray_spec.address`).
    A task whose worker dies is retried up to `max_retries` times and resumes from its last checkpoint.
    It trains on one torch thread per CPU in `num_cpus`."""
    import ray

    from rayops.session import ray_session

    train_fn, config_cls = TRAINERS[kind]
    config = config_cls.model_validate(config)
    config = config.model_copy(update={"out": _absolute_local(config.out)})
    with ray_session(ray_spec):
        options = {"num_cpus": num_cpus, "max_retries": max_retries}
        if env := training_env(num_cpus):
            options["runtime_env"] = {"env_vars": env}
        task = ray.remote(**options)(train_fn)
        # unbounded on purpose: a training run has no natural bound, and a task whose worker or node is lost is
        # retried by Ray (max_retries) and resumes from its last checkpoint
        return ray.get(task.remote(config.model_dump()), timeout=None)
