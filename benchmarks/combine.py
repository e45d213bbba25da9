"""Combination throughput: LCSC's theta = sum_i alpha_i theta_i against this machine's memory bandwidth.

Bytes moved by a combination = (K reads + 1 write) x P x 4. Memory bandwidth is measured in the same run
with a large numpy copy (read + write). Run from the repository root:

    .venv/bin/python benchmarks/combine.py [--quick]

Runtime: see `wall_time_s` in the result JSON; --quick (K=8, P=4M) writes under outputs/bench/quick/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, write_json

from lcsc_ray.checkpoints import as_tensor
from lcsc_ray.combine import combine_into


def interleaved_best(variants: dict, rounds: int) -> dict[str, float]:
    """Fastest time of each variant over `rounds` rounds that run every variant once, in turn, so that load
    from other processes on shared cores hits all variants alike (one warm-up round first)."""
    best = dict.fromkeys(variants, float("inf"))
    for round_index in range(rounds + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def naive_stream(out: torch.Tensor, tensors: list[torch.Tensor], alphas: list[float]) -> None:
    """Whole-buffer streaming: out = a0 x0; out += ai xi (3 memory passes per checkpoint)."""
    torch.mul(tensors[0], alphas[0], out=out)
    for a, x in zip(alphas[1:], tensors[1:]):
        out.add_(x, alpha=a)


def main() -> None:
    """Time the variants side by side and write benchmarks/results/combine.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="K=8, P=4M instead of K=20, P=25M")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (evaluators use 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    k, p, rounds = (8, 4_000_000, 3) if args.quick else (20, 25_000_000, 7)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(p, dtype=np.float32) for _ in range(k)]
    for a in arrays:
        a.flags.writeable = False  # like object-store arrays
    alphas = [float(a) for a in rng.standard_normal(k) / k]
    out = np.empty(p, np.float32)
    dst = np.empty(p, np.float32)
    moved = (k + 1) * p * 4
    tensors = [as_tensor(a) for a in arrays]  # the same read-only arrays, no copies
    variants = {
        # a large copy of the same duration as a combination: every checkpoint copied once into `dst`
        "numpy copy (bandwidth reference)": lambda: [np.copyto(dst, a) for a in arrays],
        "numpy out += a*x (temporaries)": lambda: _numpy_naive(out, arrays, alphas),
        "torch whole-buffer in place": lambda: naive_stream(torch.from_numpy(out), tensors, alphas),
    }
    for chunk in (1 << 16, 1 << 18, 1 << 20):
        variants[f"combine_into chunk={chunk}"] = lambda c=chunk: combine_into(
            out, arrays, alphas, chunk_size=c
        )
    best = interleaved_best(variants, rounds)
    bandwidth = 2 * k * p * 4 / best.pop("numpy copy (bandwidth reference)")
    rows = [
        {
            "variant": name,
            "seconds": seconds,
            "gb_per_s": moved / seconds / 1e9,
            "fraction_of_bandwidth": moved / seconds / bandwidth,
        }
        for name, seconds in best.items()
    ]
    expected = sum(a * x.astype(np.float64) for a, x in zip(alphas, arrays))
    combine_into(out, arrays, alphas)
    max_err = float(np.max(np.abs(out - expected)))
    print(
        f"K={k} P={p:,} torch_threads={args.threads}  numpy copy bandwidth {bandwidth / 1e9:.2f} GB/s "
        f"(read+write)  max |err| vs float64 {max_err:.2e}"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'variant':36s} {'seconds':>9s} {'GB/s':>7s} {'x bandwidth':>12s}")
    for row in rows:
        print(
            f"{row['variant']:36s} {row['seconds']:9.4f} {row['gb_per_s']:7.2f} "
            f"{row['fraction_of_bandwidth']:12.2f}"
        )
    default = next(r for r in rows if r["variant"] == "combine_into chunk=262144")
    result = {
        "machine": machine_info(),
        "k": k,
        "p": p,
        "quick": args.quick,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bytes_moved": moved,
        "rows": rows,
        "default_fraction_of_bandwidth": default["fraction_of_bandwidth"],
        "target_fraction": 0.6,
        "load_average": os.getloadavg()[0],
        "max_abs_error_vs_float64": max_err,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    results = ROOT / "outputs" / "bench" / "quick" if args.quick else ROOT / "benchmarks" / "results"
    out_path = write_json(results / "combine.json", result)
    print(
        f"default (chunk=262144): {default['fraction_of_bandwidth']:.2f} x bandwidth (target >= 0.60) "
        f"-> {out_path.relative_to(ROOT)}"
    )


def _numpy_naive(out: np.ndarray, arrays: list[np.ndarray], alphas: list[float]) -> None:
    out[:] = alphas[0] * arrays[0]
    for a, x in zip(alphas[1:], arrays[1:]):
        out += a * x


if __name__ == "__main__":
    main()
