"""Table 2's per-step costs from blocks of steps interleaved across strategies, so the machine's drift lands on
every strategy alike.

The sequential cost rounds (`paper_table2.py costs`) train one strategy after another; on a shared machine the
same strategy's per-step time moved 124-190 ms between rounds, more than any gap between strategies. Here every
strategy's pipeline is started at once in one Ray (no warm standbys, 0.08 CPU per stage so that 24 stages fit
the 2 CPUs; Ray does not cap a worker's CPU use, so this changes scheduling only) and each round runs one block
of `block_steps` steps of each strategy, in an order rotated every round. A block is a multiple of the
checkpoint interval and starts mid-interval, so each block holds exactly one save of the checkpointing strategy,
and that save's background write finishes inside the same block. Per seed, a strategy's cost is the mean of its
block means; each block's ratio to checkpointing's block of the same round is kept too (paired by round).

    python benchmarks/paper_table2.py interleaved [--seeds 0 1 2]

writes `interleaved.json` to the work dir; `report` then takes per-step costs from it (recovery costs still come
from the sequential cost rounds, which schedule the kills). About 3 minutes per seed on 2 cores.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from _common import local_ray, machine_info, write_json
from checkfree_setup import bench_spec, s3_bucket
from pipeline import Pipeline

ROUNDS, WARM_UP_STEPS = 5, 10
CPUS_PER_STAGE = 0.08


def interleaved_spec(strategy: str, seed: int, every: int | None):
    """The benchmark's model and pipeline for `strategy`, open-ended (no evaluation), without standbys."""
    extra = {"checkpointing": {"every": every}} if every else {}
    return bench_spec(
        strategy,
        seed,
        100_000,
        None,
        eval_every=100_000,
        pipeline={"warm_standby": False, "num_cpus_per_stage": CPUS_PER_STAGE},
        **extra,
    )


def one_seed(seed: int, strategies: list[str], every_of, base: str, rounds: int, block_steps: int) -> dict:
    """Every strategy started at once, warmed up, then `rounds` rounds of one block each; block means in seconds."""
    names = ["none", *strategies]
    pipelines: dict[str, Pipeline] = {}
    try:
        for name in names:
            every = None if name == "none" else every_of(name)
            uri = None if name == "none" else f"{base}/interleaved/{name}/{seed}"
            pipelines[name] = Pipeline(interleaved_spec(name, seed, every), checkpoint_uri=uri)
        for pipeline in pipelines.values():
            pipeline.block(WARM_UP_STEPS)
        blocks: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                blocks[name].append(statistics.fmean(pipelines[name].block(block_steps)))
            print(
                f"interleaved seed {seed} round {r + 1}/{rounds}: "
                + " ".join(f"{n} {blocks[n][-1] * 1e3:.0f}ms" for n in names),
                flush=True,
            )
    finally:
        for pipeline in pipelines.values():
            pipeline.executor.shutdown()
    failures = {
        name: len(p.executor.history.failures) for name, p in pipelines.items() if p.executor.history.failures
    }
    return {
        "block_step_s": blocks,
        "failures": failures,
        "costs": {name: dict(p.executor.history.costs) for name, p in pipelines.items()},
    }


def measure_interleaved(
    seeds: list[int], strategies: list[str], every_of, checkpoint_every: int, work: Path, rounds: int = ROUNDS
) -> dict:
    """Interleaved per-step costs for each seed; saved to work/interleaved.json after each seed."""
    block_steps = checkpoint_every  # one checkpoint save per block (the warm-up puts it mid-block)
    out = {
        "rounds": rounds,
        "block_steps": block_steps,
        "warm_up_steps": WARM_UP_STEPS,
        "cpus_per_stage": CPUS_PER_STAGE,
        "checkpoint_every": checkpoint_every,
        "seeds": {},
        "load_before": machine_info()["load_average"],
    }
    started = time.monotonic()
    with s3_bucket("interleaved") as base, local_ray(num_cpus=2):
        for seed in seeds:
            out["seeds"][str(seed)] = one_seed(seed, strategies, every_of, base, rounds, block_steps)
            out["total_wall_s"] = time.monotonic() - started
            write_json(work / "interleaved.json", out)
    out.update(load_after=machine_info()["load_average"], machine=machine_info(torch_threads_per_stage=1))
    write_json(work / "interleaved.json", out)
    return out


def interleaved_step_s(interleaved: dict) -> dict[int, dict[str, float]]:
    """Per seed and strategy: the mean of its block means (seconds per step)."""
    return {
        int(seed): {name: statistics.fmean(blocks) for name, blocks in row["block_step_s"].items() if blocks}
        for seed, row in interleaved["seeds"].items()
    }


def round_ratios(interleaved: dict, strategy: str, reference: str = "checkpoint") -> list[float]:
    """`strategy`'s block mean over `reference`'s in the same round, for every round of every seed."""
    return [
        a / b
        for row in interleaved["seeds"].values()
        for a, b in zip(row["block_step_s"].get(strategy, []), row["block_step_s"].get(reference, []))
    ]
