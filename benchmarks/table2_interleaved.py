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

measures one harness row per seed (all strategies' blocks) and adds them to the cost measurement; `report` then
takes per-step costs from it (recovery costs still come from the sequential cost rounds, which schedule the
kills). About 3 minutes per seed on 2 cores.
"""

from __future__ import annotations

import statistics
import time

import harness
from _common import machine_info
from checkfree_setup import bench_spec
from pipeline import Pipeline
from table2_measure import LazyCluster, without_harness_keys

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


def interleaved_sweep(
    seeds: list[int],
    strategies: list[str],
    every_of,
    checkpoint_every: int,
    rounds: int,
    cluster: LazyCluster,
) -> harness.Sweep:
    """One row per seed: every strategy's pipeline at once, `rounds` rounds of one block each."""
    # one checkpoint save per block (the warm-up puts it mid-block)
    config = {
        "strategies": list(strategies),
        "every": {name: every_of(name) for name in strategies},
        "rounds": rounds,
        "block_steps": checkpoint_every,
        "warm_up_steps": WARM_UP_STEPS,
        "cpus_per_stage": CPUS_PER_STAGE,
    }

    def measure(_: str, config: dict, seed: int) -> dict:
        every = config["every"]
        return one_seed(
            seed, config["strategies"], every.get, cluster.base(), config["rounds"], config["block_steps"]
        )

    return harness.Sweep("paper_table2_interleaved", {"blocks": config}, seeds, measure)


def interleaved_section(sweep: harness.Sweep, rows: list[dict], begun: dict) -> dict:
    """The cost measurement's `interleaved` part: the layout, each seed's blocks, the loads and the machine."""
    config = sweep.configs["blocks"]
    return {
        "rounds": config["rounds"],
        "block_steps": config["block_steps"],
        "warm_up_steps": config["warm_up_steps"],
        "cpus_per_stage": config["cpus_per_stage"],
        "checkpoint_every": config["block_steps"],
        "seeds": {str(row["seed"]): without_harness_keys(row, "seed") for row in rows},
        "load_before": begun["load_before"],
        "total_wall_s": time.monotonic() - begun["started"],
        "load_after": machine_info()["load_average"],
        "machine": machine_info(torch_threads_per_stage=1),
    }


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
