"""Combination throughput: LCSC's theta = sum_i alpha_i theta_i against this machine's memory bandwidth.

Bytes moved by a combination = (K reads + 1 write) x P x 4. Memory bandwidth is measured in the same run
with a large numpy copy (read + write). Run from the repository root:

    .venv/bin/python benchmarks/combine.py [--quick]

Rounds are the harness's seeds (7; --quick: 3, K=8, P=4M, written under outputs/bench/quick/).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness

from lcsc_ray.checkpoints import as_tensor
from lcsc_ray.combine import combine_into

COPY = "numpy copy (bandwidth reference)"
DEFAULT = "combine_into chunk=262144"


def naive_stream(out: torch.Tensor, tensors: list[torch.Tensor], alphas: list[float]) -> None:
    """Whole-buffer streaming: out = a0 x0; out += ai xi (3 memory passes per checkpoint)."""
    torch.mul(tensors[0], alphas[0], out=out)
    for a, x in zip(alphas[1:], tensors[1:]):
        out.add_(x, alpha=a)


def main() -> None:
    """Time the variants side by side (the harness interleaves them round by round) and write combine.json."""
    cli = harness.parser(__doc__, seeds=range(1, 8), quick_seeds=range(1, 4))
    cli.add_argument("--threads", type=int, default=1, help="torch threads (evaluators use 1)")
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    k, p = (8, 4_000_000) if args.quick else (20, 25_000_000)
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
        COPY: lambda: [np.copyto(dst, a) for a in arrays],
        "numpy out += a*x (temporaries)": lambda: _numpy_naive(out, arrays, alphas),
        "torch whole-buffer in place": lambda: naive_stream(torch.from_numpy(out), tensors, alphas),
    }
    for chunk in (1 << 16, 1 << 18, 1 << 20):
        variants[f"combine_into chunk={chunk}"] = lambda c=chunk: combine_into(
            out, arrays, alphas, chunk_size=c
        )
    for fn in variants.values():  # one warm-up call each
        fn()

    def measure(name: str, fn, seed: int) -> dict:
        start = time.perf_counter()
        fn()
        return {"seconds": time.perf_counter() - start}

    sweep = harness.Sweep(
        "combine",
        configs=variants,
        seeds=harness.chosen_seeds(args),
        measure=measure,
        describe=f"one combination of K={k} float32 checkpoints of P={p:,} parameters per round (round = seed), "
        f"variants interleaved; bytes moved (K reads + 1 write) = {moved:,}",
    )
    record = harness.run_record(args)
    rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # timings are never reused
    best = {name: min(r["seconds"] for r in rows if r["config"] == name) for name in variants}
    bandwidth = 2 * k * p * 4 / best.pop(COPY)
    summary = [
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
    print(f"{'variant':36s} {'best s':>9s} {'GB/s':>7s} {'x bandwidth':>12s}")
    for row in summary:
        print(
            f"{row['variant']:36s} {row['seconds']:9.4f} {row['gb_per_s']:7.2f} {row['fraction_of_bandwidth']:12.2f}"
        )
    default = next(r for r in summary if r["variant"] == DEFAULT)
    sweep.extra.update(
        k=k,
        p=p,
        torch_threads=args.threads,
        copy_bandwidth_gb_s=bandwidth / 1e9,
        bytes_moved=moved,
        best=summary,
        default_fraction_of_bandwidth=default["fraction_of_bandwidth"],
        target_fraction=0.6,
        max_abs_error_vs_float64=max_err,
    )
    paired = harness.paired_table(rows, "seconds", baseline=DEFAULT, better="lower")
    harness.finish(
        sweep,
        args,
        record,
        rows,
        paired=[paired],
        notes=[
            (
                f"default ({DEFAULT}): {default['fraction_of_bandwidth']:.2f} x the measured copy bandwidth "
                f"({bandwidth / 1e9:.2f} GB/s read+write; target >= 0.60)"
            ),
            f"max |error| against a float64 sum: {max_err:.2e}",
        ],
        title="Combination throughput",
    )


def _numpy_naive(out: np.ndarray, arrays: list[np.ndarray], alphas: list[float]) -> None:
    out[:] = alphas[0] * arrays[0]
    for a, x in zip(alphas[1:], arrays[1:]):
        out += a * x


if __name__ == "__main__":
    main()
