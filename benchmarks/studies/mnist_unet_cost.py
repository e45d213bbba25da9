"""Cost of the MNIST recipe's U-Net against a diffusers UNet2DModel matched to it, and the training step's
speed-up from 1 to 2 torch threads; side by side in one process, paired rounds.

The diffusers model runs behind the same 2x2 space-to-depth fold as ours (28x28x1 -> 14x14x4 -> UNet2DModel
-> 14x14x4 -> 28x28x1): DownBlock2D/UpBlock2D at 14x14 (32 channels) and 7x7 (64 channels),
`layers_per_block=1`, GroupNorm with 8 groups, attention only in the 7x7 middle block, the timestep
embedding as scale and shift of the second norm (`resnet_time_scale_shift="scale_shift"`), 128-wide time
embedding: the same widths, levels, norms and attention as `lcsc_ray.recipes.unet.UNet`.

Measured: one training step's forward + backward (MSE on batch 64) and one sampling forward (batch 250,
inference mode), each model in turn within a round, by wall clock and by process CPU time; the ratio per round, its median and a 95% t-interval
over rounds. Writes benchmarks/results/mnist_unet_cost.json.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/studies/mnist_unet_cost.py [--rounds 8] [--steps 4] [--quick]

Runtime: about 6 minutes on 2 quiet cores; --quick (3 rounds of 1 step, one thread count; written to
outputs/bench/quick/) well under a minute.

(PASSIVE as the recipe's training task runs: on shared cores spinning OpenMP threads stall the 2-thread rows.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/

from _common import QUICK_RESULTS, RESULTS, machine_info, write_json

from lcsc_ray.recipes.unet import build_unet


class FoldedUNet2D(nn.Module):
    """A diffusers UNet2DModel behind a 2x2 space-to-depth fold: forward(x (B,1,28,28), t (B,)) -> (B,1,28,28)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        folded = F.pixel_unshuffle(x, 2)  # (B, 4, 14, 14)
        return F.pixel_shuffle(self.unet(folded, t).sample, 2)  # (B, 1, 28, 28)


def matched_unet2d(scale_shift: bool = True) -> FoldedUNet2D:
    """The UNet2DModel matched to our default U-Net (channels (32, 64), attention at 7x7), seed 0."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=14,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=64,
        add_attention=True,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )
    return FoldedUNet2D(unet)


def _train_step_s(model: nn.Module, batch: torch.Tensor, t: torch.Tensor, steps: int) -> tuple[float, float]:
    """(wall s, CPU s) per forward + backward."""
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        (model(batch, t) - batch).square().mean().backward()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


@torch.inference_mode()
def _sample_forward_s(
    model: nn.Module, batch: torch.Tensor, t: torch.Tensor, steps: int
) -> tuple[float, float]:
    """(wall s, CPU s) per sampling forward."""
    model.eval()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model(batch, t)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _interval(ratios: list[float]) -> dict:
    """Median, mean and 95% t-interval of the mean of per-round ratios."""
    from scipy import stats

    n = len(ratios)
    mean = statistics.fmean(ratios)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(ratios) / n**0.5 if n > 1 else float("nan")
    return {
        "median": round(statistics.median(ratios), 3),
        "mean": round(mean, 3),
        "ci95": [round(mean - half, 3), round(mean + half, 3)],
        "rounds": n,
    }


def paired(models: dict[str, nn.Module], measure, batch, t, rounds: int, steps: int, threads: int) -> dict:
    """Wall and CPU seconds per call of each model, alternating the order every round; per-round ratios to
    the first model. On shared cores the 1-thread CPU-time ratio is the one that does not move with the load."""
    torch.set_num_threads(threads)
    names = list(models)
    for model in models.values():  # warm-up
        measure(model, batch, t, 1)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w, c = measure(models[name], batch, t, steps)
            wall[name].append(w)
            cpu[name].append(c)
    base = names[0]
    return {
        "threads": threads,
        "wall_s": {name: round(statistics.median(s), 4) for name, s in wall.items()},
        "cpu_s": {name: round(statistics.median(s), 4) for name, s in cpu.items()},
        "wall_ratio_to_" + base: {
            name: _interval([a / b for a, b in zip(wall[name], wall[base])]) for name in names[1:]
        },
        "cpu_ratio_to_" + base: {
            name: _interval([a / b for a, b in zip(cpu[name], cpu[base])]) for name in names[1:]
        },
    }


def thread_speedup(model: nn.Module, batch, t, rounds: int, steps: int) -> dict:
    """Training step (wall) with 1 vs 2 torch threads, paired rounds: speed-up = time(1) / time(2)."""
    times = {1: [], 2: []}
    for r in range(rounds):
        for threads in (1, 2) if r % 2 == 0 else (2, 1):
            torch.set_num_threads(threads)
            times[threads].append(_train_step_s(model, batch, t, steps)[0])
    return {
        "wall_s": {f"{k}_threads": round(statistics.median(v), 4) for k, v in times.items()},
        "speedup_2_over_1": _interval([a / b for a, b in zip(times[1], times[2])]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare at"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step at 1 thread, a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.threads = 3, 1, [1]
    models = {
        "ours": build_unet(),
        "unet2d_scale_shift": matched_unet2d(True),
        "unet2d_default": matched_unet2d(False),
    }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    train_x, train_t = torch.randn(64, 1, 28, 28, generator=generator), torch.randint(0, 1000, (64,))
    sample_x, sample_t = torch.randn(250, 1, 28, 28, generator=generator), torch.full((250,), 500)
    result = machine_info(
        rounds=args.rounds,
        steps_per_round=args.steps,
        parameters=params,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset (spins)"),
    )
    result["train_step"] = [
        paired(models, _train_step_s, train_x, train_t, args.rounds, args.steps, threads)
        for threads in args.threads
    ]
    result["sample_forward"] = [
        paired(models, _sample_forward_s, sample_x, sample_t, args.rounds, max(1, args.steps // 2), threads)
        for threads in args.threads
    ]
    if 2 in args.threads:
        result["ours_thread_speedup"] = thread_speedup(
            models["ours"], train_x, train_t, args.rounds, args.steps
        )
    result["load_average_end"] = list(os.getloadavg())
    print(f"parameters: {params}")
    for kind in ("train_step", "sample_forward"):
        for row in result[kind]:
            for clock in ("cpu", "wall"):
                ratios = {k: (v["median"], v["ci95"]) for k, v in row[f"{clock}_ratio_to_ours"].items()}
                print(
                    f"{kind:15s} threads={row['threads']} {clock} s/call={row[f'{clock}_s']} ratio={ratios}"
                )
    print(f"ours, 2 vs 1 threads: {result.get('ours_thread_speedup')}")
    print(f"load average start {result['load_average']} end {result['load_average_end']}")
    write_json((QUICK_RESULTS if args.quick else RESULTS) / "mnist_unet_cost.json", result)


if __name__ == "__main__":
    main()
