"""Combination cost per checkpoint placement (node, sharded, stream) as the model grows, and where a sharded set
lives on a 3-node cluster.

**Scale sweep** (one local Ray node, 4 logical CPUs): K checkpoints of P float32 parameters (one tensor per 1M
values) are written as safetensors files, placed in each mode and storage dtype, and combined with random
coefficients by an evaluator-like actor (1 torch thread, its own float32 buffer). Per row: seconds per combination
(median of ROUNDS after a warm-up), bytes read and moved per combination, the actor's peak RSS and its growth over
the actor before it held the set (also in models: growth / 4P; the peak counts the object store's shared memory
the actor maps, so `anon_growth_models` is the growth of its private memory alone, sampled after each
combination), the object-store bytes the set takes, and the throughput (checkpoint bytes read + one float32 model
written, per second) as a fraction of this machine's memory-copy bandwidth (measured at start). For `stream`, the files are read (8 MiB blocks, as `cat` would) right
before each combination, in the same actor, and `file_read_fraction` is the median over rounds of (file bytes
combined per second) / (file bytes read per second): a ratio measured side by side, so load from other work on
the shared cores hits both alike. `page_cache: warm` rows read files the page cache holds (memory speed);
`cold` rows evict this benchmark's own files from the page cache first (`posix_fadvise(DONTNEED)`, no root, no
effect on other files) before each file read and each combination. This machine's disk is a virtual disk, whose
host may cache it too: `cold` is "not in this machine's memory", not a bare-metal disk. `sharded` runs its 3 shards
on the one node here, so it measures the mechanism (tasks, transfers, gather), not a network. A mode that does not
fit this machine's free memory beside other work (or that the engine refuses) is a row with `refused` and why.

**Shares** (a real 3-node Ray, `ray.cluster_utils.Cluster`, 256 MiB of object store per node): sets of 687 MiB
(2.7x any node's store) and 504 MiB (2x), each placed by `auto` (so: `sharded`; an explicit `node` is refused), combined by the
actor on the head (worker nodes: 1 CPU, so that Ray keeps a worker alive there for the shard tasks between
rounds) while each node's object-store use is sampled (the raylets' own statistics,
`lcsc_ray.placement_usage`); per node: its peak use, the set's bytes it holds (object locations) and its capacity.

    .venv/bin/python benchmarks/combine_scale.py [--sizes 25000000 100000000] [--quick] [--fresh]

Writes benchmarks/results/combine_scale.json (+ .md; --quick: P = 2M, under outputs/bench/quick/).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness
from _common import local_ray

K = 12
ROUNDS = 5
TENSOR = 1_000_000  # values per tensor in the benchmark's checkpoints
MODES = ("node", "sharded", "stream")
MEMORY_MARGIN = 3 << 30  # bytes of available memory a placement leaves to the other work on this machine
SHARE_STORE = 256 << 20  # object store per node in the shares measurement
# 12 x 60 MB = 720 MB (687 MiB, 2.7x one node's store: each node's share fills 89% of it, past Ray's 80% spilling
# threshold) and 12 x 44 MB = 528 MB (2x one node's store, each share 66% of it)
SHARE_PARAMS = (15_000_000, 11_000_000)


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


def evict(paths: list[str]) -> None:
    """Drop these files (only these) from the page cache: the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: list[str]) -> tuple[int, float]:
    """(bytes, seconds) of reading the files once in 8 MiB blocks."""
    start, total = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while block := handle.read(8 << 20):
                total += len(block)
    return total, time.perf_counter() - start


def write_set(directory: Path, numel: int) -> list[str]:
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
        paths.append(str(path))
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
            self.kinds_at_start = rss_kinds()
            self.placed = placed
            self.flat = torch.empty(placed.layout.numel, dtype=torch.float32)
            placed.open(self.flat.device)

        def run(self, rounds: int, files: list[str] | None = None, cold: bool = False) -> dict:
            """`rounds` timed combinations after one warm-up; with `files`, each preceded by a read of them
            (and with `cold`, both from outside the page cache)."""
            rng = np.random.default_rng(0)
            times, reads, ratios, moved = [], [], [], {}
            kinds = dict.fromkeys(self.kinds_at_start, 0)
            for index in range(rounds + 1):
                alphas = list(map(float, rng.uniform(-1, 1, K)))
                if files:
                    if cold:
                        evict(files)
                    nbytes, seconds = read_files(files)
                    if cold:
                        evict(files)
                start = time.perf_counter()
                moved = self.placed.combine_into(self.flat, alphas)
                elapsed = time.perf_counter() - start
                for kind, value in rss_kinds().items():
                    kinds[kind] = max(kinds[kind], value - self.kinds_at_start[kind])
                if index:
                    times.append(elapsed)
                    if files:
                        reads.append(nbytes / seconds)
                        ratios.append((moved["read_bytes"] / elapsed) / (nbytes / seconds))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out = {
                "seconds": statistics.median(times),
                **moved,
                "peak_rss": peak,
                "peak_rss_growth": peak - self.rss_at_start,
                **{f"{kind}_growth": value for kind, value in kinds.items()},
            }
            if files:
                out.update(
                    file_read_bytes_per_s=statistics.median(reads),
                    file_read_fraction=statistics.median(ratios),
                )
            return out

    return Combiner


def rss_kinds() -> dict[str, int]:
    """This process's resident memory now, by kind (/proc/self/status): private (anonymous), mapped files, and
    shared memory (Ray's object store mapped into the process)."""
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return {
        name: 1024 * int(fields[key].split()[0])
        for name, key in (("rss_anon", "RssAnon"), ("rss_file", "RssFile"), ("rss_shmem", "RssShmem"))
    }


def available_memory() -> int:
    """Bytes the kernel says are available to new work (/proc/meminfo MemAvailable: free + reclaimable)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return 1024 * int(fields["MemAvailable"].split()[0])


class SetFiles:
    """The benchmark's checkpoint files of the current size (one size on disk at a time)."""

    def __init__(self) -> None:
        self.numel: int | None = None
        self.directory: Path | None = None
        self.paths: list[str] = []

    def of(self, numel: int) -> tuple[Path, list[str]]:
        if numel != self.numel:
            self.drop()
            self.directory = Path(tempfile.mkdtemp(prefix="combine-scale-"))
            self.paths, self.numel = write_set(self.directory, numel), numel
        assert self.directory is not None
        return self.directory, self.paths

    def drop(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.numel, self.directory, self.paths = None, None, []


def measure_mode(
    files: SetFiles, numel: int, storage_dtype: str, mode: str, cache: str, memcpy: float
) -> dict:
    import ray

    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.placement_sharded import place_sharded
    from schemas.errors import CheckpointError
    from schemas.search import CheckpointSetSpec

    directory, paths = files.of(numel)
    item = 4 if storage_dtype == "float32" else 2
    row = {"params": numel, "storage_dtype": storage_dtype, "mode": mode, "k": K, "page_cache": cache}
    store = 0 if mode == "stream" else K * numel * item
    if store and store + MEMORY_MARGIN > available_memory():
        gib = 1 << 30
        return {
            **row,
            "refused": f"the set takes {store / gib:.1f} GiB of object store; {available_memory() / gib:.1f} GiB "
            f"of memory is available on this machine beside other work (keeping {MEMORY_MARGIN / gib:.0f} GiB)",
        }
    # sharded: read as `stream` (nothing in the store), then cut into three shards, as on three nodes (all of them
    # this machine); placing it `sharded` here first would hold the set twice while the shards are made
    placement = "stream" if mode == "sharded" else mode
    spec = CheckpointSetSpec(uri=str(directory), storage_dtype=storage_dtype, placement=placement)
    try:
        loaded = load_checkpoint_set(spec)
    except CheckpointError as exc:
        return {**row, "refused": str(exc)}
    if mode == "sharded":
        node_id = ray.get_runtime_context().get_node_id()
        loaded.placement = place_sharded(loaded.uris, loaded.names, None, loaded.layout, [node_id] * 3)
    combiner = combiner_class().remote(loaded.placed())
    files_arg = paths if mode == "stream" else None
    out = ray.get(combiner.run.remote(ROUNDS, files_arg, cache == "cold"), timeout=3600)
    ray.kill(combiner)
    del loaded
    traffic = K * numel * item + 4 * numel  # checkpoints read + one float32 model written
    return {
        **row,
        **out,
        "object_store_bytes": store,
        "rss_growth_models": out["peak_rss_growth"] / (4 * numel),
        "anon_growth_models": out["rss_anon_growth"] / (4 * numel),
        "memcpy_fraction": traffic / out["seconds"] / memcpy,
        "file_read_fraction": out.get("file_read_fraction"),
    }


def measure_shares(numel: int, memcpy: float) -> dict:
    """The shares measurement on a 3-node cluster for a set of K x `numel` float32 values (module docstring)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.placement_usage import object_store_use, set_locations
    from schemas.errors import CheckpointError
    from schemas.search import CheckpointSetSpec

    files = SetFiles()
    directory, _ = files.of(numel)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 4, "object_store_memory": SHARE_STORE}
    )
    try:
        for _ in range(2):  # 1 CPU each: Ray keeps one idle worker there for the shard tasks between rounds
            cluster.add_node(num_cpus=1, object_store_memory=SHARE_STORE)
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        try:
            load_checkpoint_set(CheckpointSetSpec(uri=str(directory), placement="node"))
            node_refused = None
        except CheckpointError as exc:
            node_refused = str(exc)
        loaded = load_checkpoint_set(CheckpointSetSpec(uri=str(directory)))
        placed = loaded.placement
        peaks: dict[str, int] = {}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for node, use in object_store_use().items():
                    peaks[node] = max(peaks.get(node, 0), use["used"] + use["fallback"])
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        combiner = combiner_class().options(scheduling_strategy=head).remote(loaded.placed())
        out = ray.get(combiner.run.remote(ROUNDS), timeout=3600)
        stop.set()
        sampler.join()
        held = set_locations([ref for column in placed.shards for ref in column])
        final = object_store_use()
        ray.kill(combiner)
        set_bytes = K * numel * 4
        nodes = {
            node: {
                "peak_used": peaks.get(node, 0),
                "set_bytes_held": held.get(node, 0),
                "capacity": final[node]["capacity"],
                "spilled": final[node]["spilled"],
                "fallback": final[node]["fallback"],
                "peak_share_of_set": peaks.get(node, 0) / set_bytes,
            }
            for node in final
        }
        return {
            "params": numel,
            "k": K,
            "set_bytes": set_bytes,
            "nodes": 3,
            "store_per_node": SHARE_STORE,
            "placement": loaded.choice.mode,
            "reason": loaded.choice.reason,
            "node_refused": node_refused,
            "per_node": nodes,
            **out,
            "rss_growth_models": out["peak_rss_growth"] / (4 * numel),
            "anon_growth_models": out["rss_anon_growth"] / (4 * numel),
            "memcpy_fraction": (K + 1) * numel * 4 / out["seconds"] / memcpy,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        files.drop()


def main() -> None:
    cli = harness.parser(__doc__, seeds=[0], quick_seeds=[0])
    cli.add_argument("--sizes", type=int, nargs="+", default=[25_000_000, 100_000_000])
    cli.add_argument("--no-shares", action="store_true", help="skip the 3-node shares measurement")
    args = cli.parse_args()
    sizes = [2_000_000] if args.quick else args.sizes
    memcpy = memcpy_bandwidth()
    configs = {
        f"P={numel}/{dtype}/{mode}/{cache}": (numel, dtype, mode, cache)
        for numel in sizes
        for dtype in ("float32", "bfloat16")
        for mode in MODES
        for cache in (("warm", "cold") if mode == "stream" else ("warm",))
    }
    files = SetFiles()

    def measure(name: str, config: tuple, seed: int) -> dict:
        numel, dtype, mode, cache = config
        row = measure_mode(files, numel, dtype, mode, cache, memcpy)
        print(_line(row), flush=True)
        return row

    sweep = harness.Sweep(
        "combine_scale",
        configs=configs,
        seeds=harness.chosen_seeds(args),
        measure=measure,
        describe=f"K={K} float32 safetensors checkpoints of P parameters (1M-value tensors), placed node / sharded "
        f"/ stream, float32 or bfloat16 storage; median of {ROUNDS} combinations by an evaluator-like actor",
        extra={"k": K, "sizes": sizes},
    )
    record = harness.run_record(args, memcpy_bytes_per_s=memcpy)
    started = time.monotonic()
    try:
        # 4 logical CPUs: the combining actor plus one worker per shard stay alive between combinations
        with local_ray(num_cpus=4):
            rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=args.fresh)
    finally:
        files.drop()
    shares = [] if args.no_shares or args.quick else [measure_shares(n, memcpy) for n in SHARE_PARAMS]
    sweep.extra.update(shares=shares, wall_time_s=time.monotonic() - started)
    harness.finish(
        sweep, args, record, rows, notes=notes(rows, shares), title="Combination cost per placement"
    )


def _line(row: dict) -> str:
    head = f"P={row['params'] / 1e6:>5.0f}M {row['storage_dtype']:8s} {row['mode']:8s} {row['page_cache']:4s}"
    if "refused" in row:
        return f"{head} refused: {row['refused'][:160]}"
    return (
        f"{head} {row['seconds']:7.3f} s  read {row['read_bytes'] / 1e6:8.1f} MB  moved "
        f"{row['moved_bytes'] / 1e6:8.1f} MB  RSS +{row['rss_growth_models']:.2f} (private +{row['anon_growth_models']:.2f}) models  "
        f"store {row['object_store_bytes'] / 1e6:7.1f} MB  {row['memcpy_fraction']:.2f}x memcpy"
        + (f"  {row['file_read_fraction']:.2f}x file read" if row["file_read_fraction"] is not None else "")
    )


def notes(rows: list[dict], shares: dict | None) -> list[str]:
    """The findings, generated from the measured rows."""
    lines = [_line(row) for row in rows]
    for numel in sorted({r["params"] for r in rows}):
        for dtype in ("float32", "bfloat16"):
            by = {
                (r["mode"], r["page_cache"]): r
                for r in rows
                if r["params"] == numel and r["storage_dtype"] == dtype and "refused" not in r
            }
            if ("node", "warm") in by and ("sharded", "warm") in by:
                ratio = by[("node", "warm")]["seconds"] / by[("sharded", "warm")]["seconds"]
                lines.append(
                    f"P={numel / 1e6:.0f}M {dtype}: sharded at {ratio:.2f}x node's speed (goal >= 0.5)"
                )
            for cache in ("warm", "cold"):
                if ("stream", cache) in by:
                    row = by[("stream", cache)]
                    lines.append(
                        f"P={numel / 1e6:.0f}M {dtype}: stream ({cache} page cache) at {row['file_read_fraction']:.2f}x "
                        f"the file read bandwidth measured beside it ({row['file_read_bytes_per_s'] / 1e9:.2f} GB/s; "
                        "goal >= 0.5)"
                    )
    for share in shares or []:
        worst = max(n["peak_share_of_set"] for n in share["per_node"].values())
        held = max(n["set_bytes_held"] for n in share["per_node"].values()) / share["set_bytes"]
        spilled = max(n["spilled"] for n in share["per_node"].values())
        lines.append(
            f"shares: a {share['set_bytes'] / 2**20:.0f} MiB set on 3 nodes of {share['store_per_node'] / 2**20:.0f} "
            f"MiB object store: placed {share['placement']} (node refused: {share['node_refused'] is not None}); "
            f"each node holds at most {held:.2f} of the set; the fullest node's object store peaked at {worst:.2f} "
            f"of the set during combinations, {spilled / 2**20:.0f} MiB spilled to disk; {share['seconds']:.2f} s per "
            f"combination; evaluator peak RSS +{share['rss_growth_models']:.2f} models (private "
            f"+{share['anon_growth_models']:.2f})"
        )
    return lines


if __name__ == "__main__":
    main()
