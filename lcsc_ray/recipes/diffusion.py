"""DDPM forward process, training loss and the DDIM sampler over a U-Net, on diffusers' DDPMScheduler and
DDIMScheduler.

Notation: x_t = a_t x0 + s_t eps with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t).
v-prediction (Salimans & Ho 2022, "Progressive distillation", Eq. 9): v = a_t eps - s_t x0, hence
x0 = a_t x_t - s_t v and eps = s_t x_t + a_t v.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lcsc_ray.recipes.unet import UNetConfig

PREDICTION_TYPES = {
    "v": "v_prediction",
    "eps": "epsilon",
    "x0": "sample",
}  # ours -> diffusers' prediction_type
BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}  # ours -> diffusers' beta_schedule


def noise_scheduler(schedule: str, num_timesteps: int, prediction: str = "v"):
    """The forward process as diffusers' DDPMScheduler: 'cosine' is `squaredcos_cap_v2` (Nichol & Dhariwal 2021,
    Eq. 17, s=0.008, betas clipped at 0.999), 'linear' Ho et al. 2020's betas 1e-4..0.02 (scaled by 1000/T)."""
    from diffusers import DDPMScheduler

    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {sorted(BETA_SCHEDULES)}")
    scale = 1000 / num_timesteps
    return DDPMScheduler(
        num_train_timesteps=num_timesteps,
        beta_schedule=BETA_SCHEDULES[schedule],
        beta_start=1e-4 * scale,
        beta_end=0.02 * scale,
        prediction_type=PREDICTION_TYPES[prediction],
        clip_sample=True,
        clip_sample_range=1.0,
    )


def alpha_bar_schedule(schedule: str, num_timesteps: int) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float64 of DDPMScheduler's `alphas_cumprod`; see `noise_scheduler`)."""
    return noise_scheduler(schedule, num_timesteps).alphas_cumprod.double()


def model_config(model: nn.Module) -> UNetConfig:
    """The U-Net config a model carries (a consistency model's inner U-Net's), else the defaults."""
    config = getattr(model, "config", None)
    return config if isinstance(config, UNetConfig) else UNetConfig()


def _coefs(alpha_bar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = alpha_bar.to(t.device)[t].float()[:, None, None, None]  # (B, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def predict_x0_eps(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by the network output at (x_t, t) under its parametrisation."""
    out = model(x_t, t)
    a, s = _coefs(alpha_bar, t)
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    if prediction == "eps":
        return (x_t - s * out) / a, out
    return out, (x_t - a * out) / s.clamp(min=1e-8)


def diffusion_loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator, scheduler) -> torch.Tensor:
    """Mean squared error of the network's target (v, eps or x0, as the DDPMScheduler's `prediction_type`
    says) at uniformly drawn timesteps; x_t by `scheduler.add_noise`, v by `scheduler.get_velocity`."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    prediction = scheduler.config.prediction_type
    target = {
        "v_prediction": lambda: scheduler.get_velocity(x0, eps, t),
        "epsilon": lambda: eps,
        "sample": lambda: x0,
    }[prediction]()
    return (model(x_t, t) - target).square().mean()


def ddim_scheduler(config: UNetConfig):
    """diffusers' DDIMScheduler over the model's forward process: "trailing" spacing (the first step is at T-1;
    Lin et al. 2024, Table 2), x0 clipped to [-1, 1] and the last step to alpha_bar = 1 (eta 0)."""
    from diffusers import DDIMScheduler

    ddpm = noise_scheduler(config.schedule, config.num_timesteps, config.prediction)
    return DDIMScheduler.from_config(
        ddpm.config, timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=True
    )


def ddim_timesteps(nfe: int, num_timesteps: int) -> list[int]:
    """The `nfe` timesteps DDIM visits, from T-1 downwards (DDIMScheduler's "trailing" spacing)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    scheduler = ddim_scheduler(UNetConfig(num_timesteps=num_timesteps))
    scheduler.set_timesteps(nfe)
    return [int(t) for t in scheduler.timesteps]


def initial_noise(n: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """Standard normal noise (n, *shape) from a CPU generator seeded with `seed` (batch-size independent)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator)


class DiffusersView(nn.Module):
    """The recipe's U-Net as diffusers pipelines call a UNet2DModel: `view(x, t).sample`, with `config.in_channels`
    and `config.sample_size`; the DDIM config rides along as `lcsc_scheduler_config`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(in_channels=1, sample_size=28)
        self.lcsc_scheduler_config = dict(ddim_scheduler(model_config(model)).config)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, **_unused) -> SimpleNamespace:
        t_batch = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        return SimpleNamespace(sample=self.model(x, t_batch))


def ddim_sample(model: nn.Module, n: int, seed: int, nfe: int, batch_size: int = 250) -> torch.Tensor:
    """Images (n, 1, 28, 28) in [-1, 1] by deterministic DDIM (eta=0; Song et al. 2021, Eq. 12) in `nfe`
    steps of diffusers' DDIMScheduler (`ddim_scheduler`), run by the built-in diffusers sampler; the noise of
    x0 clipped to [-1, 1] is recomputed from it (`use_clipped_model_output`). The starting noise is fixed by
    `seed`, so the same model and seed give the same images, whatever the batch size."""
    from lcsc_ray.diffusers_sampling import sample

    return sample(
        DiffusersView(model),
        n,
        seed,
        nfe,
        batch_size,
        scheduler="DDIM",
        step_kwargs={"use_clipped_model_output": True},
    )


# The run identity records this: a search stored with the recipe's earlier DDIM (own float64 schedule, timesteps
# ending at 100) is not resumed with this one (benchmarks/results/recipe_ddim_diffusers.md: up to 0.3 FID apart).
ddim_sample.lcsc_revision = "diffusers-ddim-1"
