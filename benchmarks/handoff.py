"""Hand-off of a stage off a draining node, against model size: seconds and copy rate per stage.

For each width, a 4-stage pipeline (warm standby) runs a few steps; then each middle stage in turn is handed off
exactly as a preemption notice would (`checkfree_ray.draining.hand_off`: weights, Adam and lr copied to a standby,
which takes the stage's place between two steps), and the wall time of the whole hand-off and of its copy alone
are measured. The state's bytes come from `stage_state_bytes` (fp32 weights + Adam's two moments). On one machine
the "other node" is the same node, so the rate is the object store's, not a network's; the fixed costs (standby
taken, state serialised, loaded, CheckFree+ copies re-synced) are what this measures. Prints a table and writes
`benchmarks/results/handoff.json` with the load average.

    nice -n 10 .venv/bin/python benchmarks/handoff.py [--widths 64 128 256 512] [--repeats 3] [--seeds 0] [--quick]

Runtime: a few minutes on 2 cores (most of it starting the pipelines); --quick (width 64, one repeat; written to
outputs/bench/quick/) about a minute.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from _common import local_ray

from checkfree_ray.draining import decide, hand_off, stage_state_bytes
from checkfree_ray.executor import PipelineExecutor
from schemas.train import TrainSpec


def handoff_spec(width: int, layers: int = 8) -> TrainSpec:
    """A 4-stage LLaMa of `width` and `layers`, one warm standby, drains not watched (the benchmark hands off)."""
    return TrainSpec.model_validate(
        {
            "steps": 100,
            "model": {"d_model": width, "n_layers": layers, "n_heads": max(2, width // 64), "seq_len": 32},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": True,
                "standby_actors": 1,
            },
            "recovery": {"strategy": "checkfree+", "drain_poll_s": None},
        }
    )


def measure(width: int, repeats: int) -> dict:
    """Hand off stages 1 and 2 alternately `repeats` times between steps; seconds and rates per hand-off."""
    executor = PipelineExecutor(handoff_spec(width))
    executor.start()
    try:
        step = executor.run_step(executor.run_step(1))
        totals, copies, nbytes = [], [], 0
        for k in range(repeats):
            executor.pool.wait_standbys(timeout_s=300)  # a warm standby, as a running job has
            started = time.monotonic()
            copy_s, nbytes, _warm = hand_off(executor.stages, executor.saver, 1 + k % 2, frozenset())
            totals.append(time.monotonic() - started)
            copies.append(copy_s)
            step = executor.run_step(step)
        nbytes = stage_state_bytes(executor.cfg, 1)
    finally:
        executor.shutdown()
    median_copy = statistics.median(copies)
    rate = nbytes / median_copy
    return {
        "width": width,
        "state_bytes": nbytes,
        "handoff_s": totals,
        "copy_s": copies,
        "median_handoff_s": statistics.median(totals),
        "median_copy_s": median_copy,
        "copy_rate_bytes_s": rate,
        # the shortest deadline this measured rate would accept (decide(): 2x estimate + 1 s, warm)
        "min_deadline_s": next(
            s for s in range(1, 3600) if decide(int(s * 1000), 0.0, nbytes, rate, warm=True).handoff
        ),
    }


def main(argv: list[str] | None = None) -> Path:
    """Run the widths (one pipeline per width and seed), print the table, write the JSON."""
    cli = harness.parser(__doc__, seeds=[0], quick_seeds=[0])
    cli.add_argument("--widths", type=int, nargs="+", default=None, help="default 64 128 256 512 (quick 64)")
    cli.add_argument("--repeats", type=int, default=None, help="hand-offs per pipeline (default 3; quick 1)")
    args = cli.parse_args(argv)
    widths = args.widths or ([64] if args.quick else [64, 128, 256, 512])
    repeats = args.repeats or (1 if args.quick else 3)
    sweep = harness.Sweep(
        "handoff",
        configs={f"width {w}": w for w in widths},
        seeds=harness.chosen_seeds(args),
        measure=lambda _name, width, _seed: measure(width, repeats),
        describe=f"{repeats} hand-offs of a middle stage per 4-stage pipeline (8 layers, one warm standby)",
        extra={"repeats": repeats, "layers": 8, "stages": 4},
    )
    with local_ray(num_cpus=2):
        record = harness.run_record(args, repeats=repeats, layers=8, stages=4)
        rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # timings are never reused
    print(f"{'width':>6} {'state MB':>9} {'hand-off s':>11} {'copy s':>8} {'MB/s':>8} {'min deadline s':>15}")
    for row in rows:
        print(
            f"{row['width']:>6} {row['state_bytes'] / 1e6:>9.2f} {row['median_handoff_s']:>11.3f} "
            f"{row['median_copy_s']:>8.3f} {row['copy_rate_bytes_s'] / 1e6:>8.1f} {row['min_deadline_s']:>15}"
        )
    return harness.finish(sweep, args, record, rows)


if __name__ == "__main__":
    main()
