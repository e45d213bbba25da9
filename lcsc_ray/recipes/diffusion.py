"""DDPM forward process, training loss and the DDIM sampler (pure functions over a U-Net).

Notation: x_t = a_t x0 + s_t eps with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t).
v-prediction (Salimans & Ho 2022, "Progressive distillation", Eq. 9): v = a_t eps - s_t x0, hence
x0 = a_t x_t - s_t v and eps = s_t x_t + a_t v.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcsc_ray.recipes.unet import UNetConfig


def alpha_bar_schedule(schedule: str, num_timesteps: int) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float64): 'cosine' (Nichol & Dhariwal 2021, Eq. 17, s=0.008, betas
    clipped at 0.999) or 'linear' (Ho et al. 2020: betas 1e-4..0.02)."""
    steps = num_timesteps
    if schedule == "cosine":
        s = 0.008
        grid = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64) * (1000 / steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'linear'")
    return torch.cumprod(1 - betas, dim=0)


def model_config(model: nn.Module) -> UNetConfig:
    """The U-Net config a model carries (a consistency model's inner U-Net's), else the defaults."""
    config = getattr(model, "config", None)
    return config if isinstance(config, UNetConfig) else UNetConfig()


def _coefs(alpha_bar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = alpha_bar.to(t.device)[t].float()[:, None, None, None]  # (B, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def predict_x0_eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor,
                   prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by the network output at (x_t, t) under its parametrisation."""
    out = model(x_t, t)
    a, s = _coefs(alpha_bar, t)
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    if prediction == "eps":
        return (x_t - s * out) / a, out
    return out, (x_t - a * out) / s.clamp(min=1e-8)


def diffusion_loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator,
                   alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """Mean squared error of the network's target (v, eps or x0) at uniformly drawn timesteps."""
    b = x0.shape[0]
    t = torch.randint(0, alpha_bar.numel(), (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    a, s = _coefs(alpha_bar, t)
    x_t = a * x0 + s * eps
    target = {"v": a * eps - s * x0, "eps": eps, "x0": x0}[prediction]
    return (model(x_t, t) - target).square().mean()


def ddim_timesteps(nfe: int, num_timesteps: int) -> list[int]:
    """The `nfe` timesteps DDIM visits, evenly spaced from T-1 downwards ("trailing" spacing, which
    starts at the last timestep; Lin et al. 2024, Table 2)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return [round((num_timesteps - 1) * (1 - i / nfe)) for i in range(nfe)]


def initial_noise(n: int, seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """Standard normal noise (n, *shape) from a CPU generator seeded with `seed` (batch-size independent)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def ddim_sample(model: nn.Module, n: int, seed: int, nfe: int, batch_size: int = 250) -> torch.Tensor:
    """Images (n, 1, 28, 28) in [-1, 1] by deterministic DDIM (eta=0; Song et al. 2021, Eq. 12) in `nfe`
    steps; the starting noise is fixed by `seed`, so the same model and seed give the same images."""
    config = model_config(model)
    alpha_bar = alpha_bar_schedule(config.schedule, config.num_timesteps)
    steps = ddim_timesteps(nfe, config.num_timesteps)
    device = _device(model)
    noise = initial_noise(n, seed)
    out = torch.empty(n, 1, 28, 28)
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size].to(device)  # (b, 1, 28, 28)
        for i, t in enumerate(steps):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            x0, _ = predict_x0_eps(model, x, t_batch, alpha_bar, config.prediction)
            x0 = x0.clamp(-1, 1)
            a_t, s_t = alpha_bar[t].sqrt().item(), (1 - alpha_bar[t]).sqrt().item()
            eps = (x - a_t * x0) / s_t
            ab_prev = alpha_bar[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
            x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        out[start:start + batch_size] = x.clamp(-1, 1).float().cpu()
    return out
