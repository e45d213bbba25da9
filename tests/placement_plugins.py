"""A model of adjustable size for placement tests: the tiny denoiser plus a large parameter that only makes the
checkpoints big (the sampler never reads it), and a writer of such checkpoint sets."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tests.lcsc_plugins import TinyNet, trajectory


class WideNet(TinyNet):
    """TinyNet with a `ballast` parameter of `numel` float32 values."""

    def __init__(self, numel: int, channels: int = 4):
        super().__init__(channels)
        self.ballast = nn.Parameter(torch.zeros(numel))


def build_wide(numel: int) -> nn.Module:
    """A WideNet with seeded weights."""
    torch.manual_seed(0)
    return WideNet(numel)


def write_wide_run(directory: Path, num: int, numel: int) -> int:
    """`num` checkpoints of a WideNet (tiny trajectory + random ballast), written one at a time; returns the
    bytes of one checkpoint as float32."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(3)
    for index, state in enumerate(trajectory(num)):
        state["ballast"] = torch.randn(numel, generator=generator)
        step = 100 * (index + 1)
        save_file(state, str(directory / f"ckpt-{step:06d}.safetensors"), metadata={"step": str(step)})
        del state
    return 4 * (numel + sum(t.numel() for t in trajectory(1)[0].values()))
