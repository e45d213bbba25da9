"""Tiny plug-ins for the LCSC engine tests: a conv model, a deterministic toy sampler, a feature net, data."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

IMAGE = 8  # images are (1, 8, 8)


class TinyNet(nn.Module):
    """Conv -> BatchNorm (with an int64 buffer) -> tanh -> conv: a stand-in for a denoiser."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.norm(self.conv1(x))))


def build_tiny(channels: int = 4, seed: int = 0) -> nn.Module:
    """A TinyNet with seeded weights."""
    torch.manual_seed(seed)
    return TinyNet(channels)


def toy_sample(
    model: nn.Module, n: int, seed: int, nfe: int, batch_size: int, scale: float = 0.5
) -> torch.Tensor:
    """Deterministic 'sampler': noise from `seed`, `nfe` residual steps, squashed to [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, IMAGE, IMAGE, generator=generator)
    out = []
    for batch in x.split(batch_size):
        for _ in range(nfe):
            batch = batch - scale * model(batch)
        out.append(torch.tanh(batch))
    return torch.cat(out)


def tiny_features(dim: int = 6, seed: int = 123) -> nn.Module:
    """A fixed random projection of the image to `dim` features."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(IMAGE * IMAGE, dim), nn.Tanh()).eval()


def reference_images(n: int = 256, seed: int = 7) -> torch.Tensor:
    """Smooth random images in [-1, 1], (n, 1, 8, 8)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(n, 1, IMAGE, IMAGE, generator=generator) * 0.7 + 0.2)


def trajectory(num: int, channels: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """State dicts of a fake training run: weights drift a little from step to step."""
    model = build_tiny(channels, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    states = []
    for _ in range(num):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def write_run(directory: Path, num: int = 4, steps: list[int] | None = None, **kw) -> list[Path]:
    """Write `num` safetensors checkpoints with 'step' metadata into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    steps = steps or [100 * (i + 1) for i in range(num)]
    paths = []
    for step, state in zip(steps, trajectory(num, **kw)):
        path = directory / f"ckpt-{step:06d}.safetensors"
        save_file(state, str(path), metadata={"step": str(step)})
        paths.append(path)
    return paths
