"""A small U-Net for 28x28x1 images with a timestep embedding (the DDPM and consistency-model skeleton).

Resolutions 28 -> 14 -> 7, one skip per level, residual blocks with adaptive group norm (scale and
shift from the timestep embedding), self-attention at 7x7. About 0.53M parameters at the defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

PREDICTIONS = ("v", "eps", "x0")
SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture and diffusion parametrisation; checkpoints carry it in their metadata."""

    channels: tuple[int, ...] = (32, 64)  # one entry per level: 14x14 and 7x7 (after 2x2 fold)
    blocks_per_level: int = 1
    emb_dim: int = 128
    attention: bool = True  # self-attention in the middle (7x7)
    groups: int = 8
    prediction: str = "v"  # what the network outputs: v (Salimans & Ho 2022), eps or x0
    schedule: str = "cosine"  # alpha-bar schedule of the forward process
    num_timesteps: int = 1000
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"UNetConfig.prediction={self.prediction!r}; use one of {PREDICTIONS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"UNetConfig.schedule={self.schedule!r}; use one of {SCHEDULES}")
        if len(self.channels) != 2:
            raise ValueError("UNetConfig.channels needs 2 entries (for the 14x14 and 7x7 levels)")
        if self.extra:
            raise ValueError(
                f"unknown U-Net options {sorted(self.extra)}; known: {sorted(unet_kwargs_names())}"
            )

    def to_kwargs(self) -> dict:
        """Plain keyword arguments that rebuild this config (JSON-serialisable)."""
        kwargs = asdict(self)
        kwargs.pop("extra")
        kwargs["channels"] = list(self.channels)
        return kwargs


def unet_kwargs_names() -> set[str]:
    """Names `build_unet` accepts."""
    return {
        "channels",
        "blocks_per_level",
        "emb_dim",
        "attention",
        "groups",
        "prediction",
        "schedule",
        "num_timesteps",
    }


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of (possibly fractional) timesteps (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second norm modulated by the timestep embedding (scale, shift)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(attn.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps/v/x0-predicting U-Net: forward(x (B,1,28,28), t (B,) timestep indices) -> (B,1,28,28).

    The image is first folded 2x2 into channels (pixel unshuffle: (B,4,14,14)), so the levels run at
    14x14 and 7x7; that keeps a forward pass near 20M multiply-adds per image on the CPU.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        chans, e, g = config.channels, config.emb_dim, config.groups
        levels = len(chans)
        self.time_mlp = nn.Sequential(nn.Linear(chans[0], e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(4, chans[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.ModuleList(ResBlock(c, c, e, g) for _ in range(config.blocks_per_level)) for c in chans
        )
        self.downsample = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(levels - 1)
        )  # 14->7
        self.mid1 = ResBlock(chans[-1], chans[-1], e, g)
        self.mid_attn = Attention(chans[-1], g) if config.attention else nn.Identity()
        self.mid2 = ResBlock(chans[-1], chans[-1], e, g)
        self.up = nn.ModuleList(
            nn.ModuleList(ResBlock(2 * c if j == 0 else c, c, e, g) for j in range(config.blocks_per_level))
            for c in reversed(chans)
        )
        self.upsample = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i - 1], 1) for i in range(levels - 1, 0, -1)
        )  # then nearest x2
        self.norm_out = nn.GroupNorm(g, chans[0])
        self.conv_out = nn.Conv2d(chans[0], 4, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.channels[0]))  # (B, E)
        h = self.conv_in(F.pixel_unshuffle(x, 2))  # (B, c0, 14, 14)
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)  # (B, c1, 7, 7)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, 2c, H, W)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = F.interpolate(self.upsample[i](h), scale_factor=2.0, mode="nearest")
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)  # (B, 1, 28, 28)


def build_unet(**kwargs) -> UNet:
    """The DDPM skeleton: a deterministic (seed 0) initialisation of `UNet(UNetConfig(**kwargs))`."""
    known = {k: v for k, v in kwargs.items() if k in unet_kwargs_names()}
    extra = {k: v for k, v in kwargs.items() if k not in unet_kwargs_names()}
    if "channels" in known:
        known["channels"] = tuple(known["channels"])
    config = UNetConfig(**known, extra=extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet(config)
