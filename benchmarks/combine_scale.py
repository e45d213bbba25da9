"""Combination cost per checkpoint placement (node, sharded, stream) as the model grows.

K checkpoints of P float32 parameters (one tensor per 1M values) are written as safetensors files, placed in
each mode, and combined with random coefficients by an evaluator-like actor (1 torch thread, its own buffer).
Per mode and size: seconds per combination (median of 5 after a warm-up), bytes read and moved per combination,
peak RSS of the combining process (and its growth over the process before it held the set: imports and
the actor itself excluded), the object-store bytes the set takes, and the throughput (checkpoint bytes
read + one float32 model written, per second) as a fraction of this machine's measured memory-copy bandwidth;
for `stream` also against the file read bandwidth measured on the same files (page cache warm: this machine's
files sit in memory, so the disk is not what is measured). All nodes are this one machine: `sharded` runs its
3 shards on one local node (4 logical CPUs, so that a worker per shard stays alive as on 3 nodes),
which measures the mechanism (tasks, transfers, gather), not a network.

    .venv/bin/python benchmarks/combine_scale.py [--sizes 5000000 25000000] [--quick]

Writes benchmarks/results/combine_scale.json (--quick: outputs/bench/quick/) and prints a table.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import QUICK_RESULTS, RESULTS, local_ray, machine_info, write_json

K = 12
TENSOR = 1_000_000  # values per tensor in the benchmark's checkpoints
MODES = ("node", "sharded", "stream")


def memcpy_bandwidth() -> float:
    """Bytes per second of a large numpy copy, read + write counted (the best of 5)."""
    src = np.ones(64_000_000, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def file_read_bandwidth(paths: list[Path]) -> float:
    """Bytes per second of reading the checkpoint files in 8 MiB blocks (page cache warm, after one pass)."""
    for warm in (True, False):
        start, total = time.perf_counter(), 0
        for path in paths:
            with open(path, "rb", buffering=0) as handle:
                while block := handle.read(8 << 20):
                    total += len(block)
        if not warm:
            return total / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def write_set(directory: Path, numel: int) -> list[Path]:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(K):
        state, left, part = {}, numel, 0
        while left:
            size = min(TENSOR, left)
            state[f"layer{part:04d}.weight"] = torch.randn(size, generator=generator)
            left, part = left - size, part + 1
        path = directory / f"ckpt-{index + 1:04d}.safetensors"
        save_file(state, str(path), metadata={"step": str(index + 1)})
        paths.append(path)
        del state
    return paths


def combiner_class():
    import ray

    @ray.remote(num_cpus=1)
    class Combiner:
        """Holds a placed set and one float32 buffer, as an evaluator does; times combinations."""

        def __init__(self, placed):
            torch.set_num_threads(1)
            self.rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.placed = placed
            self.flat = torch.empty(placed.layout.numel, dtype=torch.float32)
            placed.open(self.flat.device)

        def run(self, rounds: int) -> dict:
            rng = np.random.default_rng(0)
            times, moved = [], {}
            for index in range(rounds + 1):
                alphas = list(map(float, rng.uniform(-1, 1, K)))
                start = time.perf_counter()
                moved = self.placed.combine_into(self.flat, alphas)
                if index:
                    times.append(time.perf_counter() - start)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return {
                "seconds": statistics.median(times),
                **moved,
                "peak_rss": peak,
                "peak_rss_growth": peak - self.rss_at_start,
            }

    return Combiner


def measure(directory: Path, numel: int, storage_dtype: str, mode: str, node_id: str) -> dict:
    import ray

    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.placement_sharded import place_sharded
    from schemas.search import CheckpointSetSpec

    spec = CheckpointSetSpec(uri=str(directory), storage_dtype=storage_dtype, placement=mode)
    loaded = load_checkpoint_set(spec)
    if mode == "sharded":  # three shards, as on three nodes (all of them this machine)
        loaded.placement = place_sharded(loaded.uris, loaded.names, None, loaded.layout, [node_id] * 3)
    combiner = combiner_class().remote(loaded.placed())
    out = ray.get(combiner.run.remote(5), timeout=1800)
    ray.kill(combiner)
    store = 0 if mode == "stream" else loaded.layout.nbytes * K
    del loaded
    return {**out, "object_store_bytes": store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000_000, 25_000_000])
    parser.add_argument("--quick", action="store_true", help="P = 2M only, results under outputs/bench/quick")
    args = parser.parse_args()
    sizes = [2_000_000] if args.quick else args.sizes
    started = time.monotonic()
    memcpy = memcpy_bandwidth()
    rows = []
    # 4 logical CPUs: the combining actor plus one worker per shard stay alive between combinations (with fewer,
    # Ray ends the idle workers past its soft limit and starts a fresh one, with its imports, for every round)
    with local_ray(num_cpus=4):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for numel in sizes:
            directory = Path(tempfile.mkdtemp(prefix="combine-scale-"))
            try:
                paths = write_set(directory, numel)
                disk = file_read_bandwidth(paths)
                for storage_dtype in ("float32", "bfloat16"):
                    for mode in MODES:
                        row = measure(directory, numel, storage_dtype, mode, node_id)
                        item = 4 if storage_dtype == "float32" else 2
                        traffic = K * numel * item + 4 * numel  # checkpoints read + one float32 model written
                        row.update(
                            params=numel,
                            storage_dtype=storage_dtype,
                            mode=mode,
                            k=K,
                            memcpy_fraction=traffic / row["seconds"] / memcpy,
                            file_read_fraction=(
                                row["read_bytes"] / row["seconds"] / disk if mode == "stream" else None
                            ),
                        )
                        rows.append(row)
                        print(
                            f"P={numel / 1e6:>5.0f}M {storage_dtype:8s} {mode:8s} {row['seconds']:7.3f} s  "
                            f"read {row['read_bytes'] / 1e6:8.1f} MB  moved {row['moved_bytes'] / 1e6:8.1f} MB  "
                            f"RSS +{row['peak_rss_growth'] / 1e6:7.1f} MB  store {row['object_store_bytes'] / 1e6:7.1f} MB"
                            f"  {row['memcpy_fraction']:.2f}x memcpy"
                            + (f"  {row['file_read_fraction']:.2f}x file read" if mode == "stream" else ""),
                            flush=True,
                        )
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    payload = {
        "machine": machine_info(memcpy_bytes_per_s=memcpy, file_read_bytes_per_s=disk),
        "k": K,
        "sizes": sizes,
        "rows": rows,
        "wall_time_s": time.monotonic() - started,
    }
    target = (QUICK_RESULTS if args.quick else RESULTS) / "combine_scale.json"
    print(f"wrote {write_json(target, payload)}")


if __name__ == "__main__":
    main()
