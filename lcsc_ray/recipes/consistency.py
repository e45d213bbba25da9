"""Consistency model by consistency distillation (CD) from the MNIST DDPM (Song et al. 2023, Alg. 2), in the
discrete-time form of Latent Consistency Models (Luo et al. 2023): the ODE solver is one DDIM step of
the teacher between neighbouring points of an N-point timestep grid, and

    f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_theta(x_t, t)                (Song et al., Eq. 5)

with c_skip(t) = sigma_d^2 / ((10 t)^2 + sigma_d^2), c_out(t) = 10 t / sqrt((10 t)^2 + sigma_d^2), so
f(x, 0) = x exactly (the boundary condition). The student starts from the teacher's weights; the target
network is an EMA of the student (decay mu, Song et al. Alg. 2); the distance is pseudo-Huber (Song &
Dhariwal 2023, "Improved techniques", Sec. 3.3) with c = 0.00054 sqrt(d).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcsc_ray.recipes.diffusion import (
    _coefs,
    alpha_bar_schedule,
    ddim_timesteps,
    initial_noise,
    predict_x0_eps,
)
from lcsc_ray.recipes.unet import UNet, build_unet

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_coefs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of shape (B, 1, 1, 1) for integer timesteps t (B,); c_skip(0)=1, c_out(0)=0."""
    scaled = t.float()[:, None, None, None] * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


class ConsistencyModel(nn.Module):
    """f(x_t, t) -> x0 estimate, around a U-Net (state-dict keys 'unet.*')."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        alpha_bar = alpha_bar_schedule(unet.config.schedule, unet.config.num_timesteps)
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0, _ = predict_x0_eps(self.unet, x_t, t, self.alpha_bar, self.config.prediction)
        c_skip, c_out = boundary_coefs(t)
        return c_skip * x_t + c_out * x0  # (B, 1, 28, 28)


def build_consistency_model(**kwargs) -> ConsistencyModel:
    """The consistency-model skeleton: `ConsistencyModel(build_unet(**kwargs))` (kwargs: UNetConfig fields)."""
    return ConsistencyModel(build_unet(**kwargs))


def timestep_grid(num_points: int, num_timesteps: int) -> torch.Tensor:
    """The N+1 grid timesteps 0 = t_0 < ... < t_N = T-1 (long) that distillation steps between."""
    return torch.linspace(0, num_timesteps - 1, num_points + 1).round().long()


def pseudo_huber(diff: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Mean over the batch of sqrt(||diff||^2 + c^2) - c, c = 0.00054 sqrt(dim) by default."""
    flat = diff.flatten(1)
    c = 0.00054 * math.sqrt(flat.shape[1]) if c is None else c
    return ((flat.square().sum(1) + c * c).sqrt() - c).mean()


def distillation_loss(
    student: ConsistencyModel,
    x0: torch.Tensor,
    generator: torch.Generator,
    teacher: nn.Module,
    target: ConsistencyModel,
    grid: torch.Tensor,
) -> torch.Tensor:
    """CD loss d(f_theta(x_{t_n+1}, t_n+1), f_target(x_hat_{t_n}, t_n)) with x_hat one teacher DDIM step."""
    b = x0.shape[0]
    n = torch.randint(1, grid.numel(), (b,), generator=generator)
    t, s = grid[n].to(x0.device), grid[n - 1].to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    alpha_bar = student.alpha_bar
    a_t, s_t = _coefs(alpha_bar, t)
    x_t = a_t * x0 + s_t * eps
    with torch.no_grad():
        x0_hat, eps_hat = predict_x0_eps(teacher, x_t, t, alpha_bar, student.config.prediction)
        a_s, s_s = _coefs(alpha_bar, s)
        x_s = a_s * x0_hat + s_s * eps_hat  # DDIM (eta=0) step t -> s of the teacher's ODE
        target_out = target(x_s, s)
    return pseudo_huber(student(x_t, t) - target_out)


def sampling_timesteps(nfe: int, num_timesteps: int, grid_points: int = 50) -> list[int]:
    """`nfe` timesteps from T-1 down, snapped to the distillation grid (the student is trained there)."""
    grid = timestep_grid(grid_points, num_timesteps)
    out = []
    for t in ddim_timesteps(nfe, num_timesteps):
        snapped = int(grid[(grid - t).abs().argmin()])
        if snapped > 0 and snapped not in out:
            out.append(snapped)
    return out


@torch.inference_mode()
def consistency_sample(model: nn.Module, n: int, seed: int, nfe: int, batch_size: int = 250) -> torch.Tensor:
    """Images (n, 1, 28, 28) in [-1, 1]: one step x0 = f(x_T, T-1) for nfe=1; multistep sampling (Song et al.
    2023, Alg. 1) re-noises x0 to each next timestep and applies f again. Noise fixed by `seed`."""
    alpha_bar = model.alpha_bar.cpu().double()
    steps = sampling_timesteps(nfe, model.config.num_timesteps)
    device = next(model.parameters()).device
    noise = initial_noise(n, seed)  # same starting noise as ddim_sample for this seed
    generator = torch.Generator().manual_seed(seed + 7919)  # re-noising draws, independent of the above
    renoise = torch.randn((max(len(steps) - 1, 0), n, 1, 28, 28), generator=generator)
    out = torch.empty(n, 1, 28, 28)
    for start in range(0, n, batch_size):
        x = noise[start : start + batch_size].to(device)
        x = model(x, torch.full((x.shape[0],), steps[0], dtype=torch.long, device=device)).clamp(-1, 1)
        for k, t in enumerate(steps[1:]):
            z = renoise[k, start : start + batch_size].to(device)
            x = math.sqrt(alpha_bar[t]) * x + math.sqrt(1 - alpha_bar[t]) * z
            x = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=device)).clamp(-1, 1)
        out[start : start + batch_size] = x.float().cpu()
    return out


# The run identity records this; revision 1 read alpha_bar from the float64 cosine written out, this one from
# DDPMScheduler's float32 `alphas_cumprod` (the recipe's forward process since the move to diffusers).
consistency_sample.lcsc_revision = "ddpm-scheduler-1"
