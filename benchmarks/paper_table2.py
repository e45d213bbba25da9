"""The paper's Table 2 with an honest cost model: time to a target validation loss per strategy and failure rate.

Three parts, each its own command (so that only the timing measurement runs at normal priority):

    python benchmarks/paper_table2.py costs [--quick]          # per-step and recovery costs, no failures drawn
    nice -n 10 python benchmarks/paper_table2.py runs [--quick] # time to target under drawn stage kills
    python benchmarks/paper_table2.py report                    # table, JSON, PNG and Markdown from both

and, for per-step costs the machine's drift cannot bias, `interleaved` (`table2_interleaved.py`): blocks of steps
of every strategy interleaved in one round; when its file is in the work dir, `report` takes per-step costs from it.

(`all` runs the three in a row; `runs --seeds 1 --work DIR` in separate processes, merged by
`report --runs-files DIR1/runs.json DIR2/runs.json`, use more of a machine's cores.)

Runtime, measured on 2 shared cores: `costs --quick` (one seed, 5 runs) 4 min at load 6-23; a full cost round ~7 min per seed at load 3-6 (estimated from the quick one) and 12-20 min at load 80-100;
`runs` 1-2 min per run at load 3 (2 seeds x 13 runs took 14 min) and 3-7 min per run at load 80-100, where stage
start-up alone can take minutes; report seconds. Default seeds 0 1 2.

**costs** trains each strategy (none, checkpoint, redundant, checkfree, checkfree+, hybrid; `--strategies` picks)
side by side in paired rounds, one round per seed in a rotated order, without drawn failures: the mean wall
time per committed step over a fixed window (CheckFree+'s swap and (de)embedding copies, redundant
computation's replication and checkpointing's save stall are all in it), then four scheduled kills (a middle
stage and an outer one, each with a warm standby ready and again while the standby is still starting) whose
extra wall time is each recovery's cost (detection + rebuild + retried step), by method and warm/cold.

**runs** trains each strategy under stage kills drawn at the paper's three failure rates until the target,
checking it every 5 steps; checkpoints go to a real SeaweedFS S3 server on loopback.

**report** applies the measured *relative* costs to one base iteration time (the paper's checkpointing 91.5 s),
the same way for every strategy (`table2_model.py`):

    modelled_s = 91.5 * (c_s / c_ckpt) * (steps_to_target + lost_steps) + 91.5 * sum(recovery_s) / c_ckpt

and prints the measured wall-clock speed-ups over checkpointing and the modelled ones, with 95% intervals over
the seeds. Writes benchmarks/results/paper_table2.json, .png and .md (notes generated from the values).

Failure model: stage s dies at step t when u(failures.seed, t)[s] < p (the failure stream of the seed, apart
from data order and weights). The paper's per-step p (5/10/16 % per stage per hour at 91.5 s per iteration:
0.0009/0.002/0.004) gives under one failure in our ~100 steps, so p is multiplied by FAILURE_SCALE and the
checkpoint interval (the paper's 100) divided by it. p is per step, the same for every strategy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import RESULTS, local_ray, machine_info, write_json
from checkfree_setup import BENCH_MODEL, BENCH_PIPELINE, EVAL_EVERY, bench_spec, cost_run, run_one, s3_bucket
from table2_interleaved import measure_interleaved
from table2_notes import costs_by_seed, report_tables, write_notes

__all__ = ["RESULTS", "bench_spec", "run_one"]  # recovery_ablation.py imports these from here

PAPER_P = {"5%": 0.0009, "10%": 0.002, "16%": 0.004}  # per stage per iteration (paper, Table 2 setting)
FAILURE_SCALE = 5.0
PAPER_CHECKPOINT_EVERY = 100
STRATEGIES = ["checkpoint", "redundant", "checkfree", "checkfree+", "hybrid"]
COLORS = {
    "checkpoint": "tab:green",
    "redundant": "tab:red",
    "checkfree": "tab:blue",
    "checkfree+": "tab:orange",
    "hybrid": "tab:purple",
}
# Cost runs: the per-step window, then a middle-stage and an outer-stage kill, then a few steps to recover.
# Each pair of kills: one with a warm standby ready, one a few steps later (the standby is still starting: cold).
COST_LAYOUT = {
    "full": {"window": (3, 42), "kills": [(45, 1), (48, 0), (75, 0), (78, 1)], "steps": 90},
    "quick": {"window": (3, 22), "kills": [(25, 1), (27, 0), (45, 0), (47, 1)], "steps": 50},
}
WORK = Path(tempfile.gettempdir()) / "paper_table2"
START_RETRIES = 2


def checkpoint_every() -> int:
    """The scaled checkpoint interval (every strategy's fallback, and checkpointing itself)."""
    return round(PAPER_CHECKPOINT_EVERY / FAILURE_SCALE)


def strategy_every(strategy: str) -> int | None:
    """`checkpointing.every` of a strategy's runs: the scaled interval, except for hybrid, whose interval
    Young/Daly sets from its measured save cost and the failure rate (`checkfree_ray/hybrid.py`; the spec's
    `failures.probability_per_step` is its prior), bounded only by the default 1000 steps."""
    return None if strategy == "hybrid" else checkpoint_every()


def _rotated(names: list[str], index: int) -> list[str]:
    """`names` rotated by `index`, so each strategy runs first once in a while (spreads the machine's drift)."""
    k = index % len(names)
    return names[k:] + names[:k]


def measure_costs(seeds: list[int], strategies: list[str], quick: bool, work: Path) -> dict:
    """Paired cost rounds (one per seed) of none and every strategy; saved to work/costs.json after each run."""
    layout = COST_LAYOUT["quick" if quick else "full"]
    out = {
        "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in layout.items()},
        "checkpoint_every": checkpoint_every(),
        "load_before": machine_info()["load_average"],
        "rows": [],
        "machine": machine_info(torch_threads_per_stage=1, niceness=_niceness()),
    }  # replaced at the end
    started = time.monotonic()
    with s3_bucket("costs") as base, local_ray(num_cpus=2):
        for index, seed in enumerate(seeds):
            for strategy in _rotated(["none", *strategies], index):
                none = strategy == "none"
                row = cost_run(
                    strategy,
                    seed,
                    layout["window"],
                    [] if none else layout["kills"],
                    layout["window"][1] if none else layout["steps"],
                    None if none else strategy_every(strategy),
                    None if none else f"{base}/{strategy}/{seed}",
                )
                out["rows"].append(row)
                print(f"costs seed {seed} {strategy}: {row['wall_s']:.1f}s {row['error'] or ''}", flush=True)
                write_json(work / "costs.json", out)
    out.update(
        load_after=machine_info()["load_average"],
        total_wall_s=time.monotonic() - started,
        machine=machine_info(torch_threads_per_stage=1, niceness=_niceness()),
    )
    write_json(work / "costs.json", out)
    return out


def run_started(spec, checkpoint_uri: str | None) -> dict:
    """`run_one`, started again (up to START_RETRIES times, into a fresh checkpoint prefix) when its stages did
    not start in time on a loaded machine: a run that never stepped measures the machine, not the strategy."""
    for attempt in range(START_RETRIES + 1):
        uri = (
            checkpoint_uri if checkpoint_uri is None or attempt == 0 else f"{checkpoint_uri}/start-{attempt}"
        )
        run = run_one(spec, checkpoint_uri=uri)
        if run["executed_steps"] > 0 or not run["error"]:
            break
        print(
            f"{spec.recovery.strategy} seed {spec.seed}: did not start ({run['error']}); starting again",
            flush=True,
        )
    run["start_retries"] = attempt
    return run


def measure_runs(
    seeds: list[int],
    strategies: list[str],
    target: float,
    max_steps: int,
    quick: bool,
    work: Path,
    rates: list[str] | None = None,
) -> dict:
    """Every run, side by side in one Ray: the no-failure reference, then every strategy at every rate."""
    rates = rates or list(PAPER_P)
    out: dict = {
        "target_val_loss": target,
        "seeds": seeds,
        "quick": quick,
        "max_steps": max_steps,
        "eval_every": EVAL_EVERY,
        "reference": [],
        "runs": {},
        "load_before": machine_info()["load_average"],
        "machine": machine_info(torch_threads_per_stage=1, niceness=_niceness()),
    }  # replaced at the end
    started = time.monotonic()
    with s3_bucket("table2") as base, local_ray(num_cpus=2):
        for seed in seeds:
            print(f"seed {seed}: none (no failures)", flush=True)
            out["reference"].append(run_started(bench_spec("none", seed, max_steps, target), None))
            for index, (rate, p) in enumerate((r, PAPER_P[r]) for r in rates):
                for strategy in _rotated(strategies, index):
                    spec = bench_spec(
                        strategy,
                        seed,
                        max_steps,
                        target,
                        checkpointing={"every": strategy_every(strategy)},
                        failures={"probability_per_step": p * FAILURE_SCALE, "seed": seed},
                    )
                    run = run_started(spec, f"{base}/{rate}/{strategy}/{seed}")
                    out["runs"].setdefault(rate, []).append(run)
                    out["total_wall_s"] = time.monotonic() - started
                    write_json(work / "runs.json", out)
                    print(
                        f"seed {seed} {rate} {strategy}: reached={run['reached']} at {run['steps_to_target']} "
                        f"executed={run['executed_steps']} wall={run['wall_s']:.1f}s "
                        f"recoveries={run['recovery_methods']} {run['error'] or ''}",
                        flush=True,
                    )
    out.update(
        load_after=machine_info()["load_average"],
        machine=machine_info(torch_threads_per_stage=1, niceness=_niceness()),
    )
    write_json(work / "runs.json", out)
    return out


def _niceness() -> int:
    import os

    return os.nice(0)


def failure_model(every: int) -> dict:
    """The failure model's parameters, stated in the table header and the JSON."""
    return {
        "paper_hourly_rate_per_stage": list(PAPER_P),
        "paper_probability_per_step": PAPER_P,
        "paper_step_time_assumed_s": 91.5,
        "failure_scale": FAILURE_SCALE,
        "probability_per_step": {r: p * FAILURE_SCALE for r, p in PAPER_P.items()},
        "checkpoint_every": every,
        "paper_checkpoint_every": PAPER_CHECKPOINT_EVERY,
        "seed_streams": "weights and data order from the run seed's streams; failure draws "
        "u(failures.seed = run seed, step) from its own failure stream (checkfree_ray/data.py)",
        "fallback": f"redundant, checkfree and checkfree+ also checkpoint every {every} steps, for losses they cannot "
        "rebuild (checkfree: outer stages; all: adjacent stages lost together); hybrid checkpoints at its own "
        "Young/Daly interval (at most 1000 steps), from its measured save cost and the failure rate",
    }


def plot(runs: dict, seed: int, path: Path) -> None:
    """Validation loss against wall time per strategy, one panel per failure rate (first seed)."""
    rates = list(runs["runs"])
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), dpi=100, sharey=True, squeeze=False)
    ref = next((r for r in runs["reference"] if r["seed"] == seed), None)
    for ax, rate in zip(axes[0], rates):
        if ref is not None:
            ax.plot(ref["val_wall_s"], ref["val_losses"], "k--", lw=1, label="none (no failures)")
        for run in runs["runs"][rate]:
            if run["seed"] == seed:
                ax.plot(
                    run["val_wall_s"],
                    run["val_losses"],
                    "-",
                    lw=1.2,
                    label=run["strategy"],
                    color=COLORS.get(run["strategy"]),
                )
        ax.axhline(runs["target_val_loss"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"failure rate {rate} (p x{FAILURE_SCALE:g}), seed {seed}")
        ax.set_xlabel("measured wall time (s)")
    axes[0][0].set_ylabel("validation loss (nats/byte)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(costs: dict, runs: dict) -> dict:
    """Combine the cost rounds and the runs: print the tables, write the JSON, the PNG and the Markdown."""
    per_seed = costs_by_seed(costs)
    tables = report_tables(per_seed, runs, costs["median_step_s"])
    out = {
        "benchmark": "paper_table2",
        "failure_model": failure_model(checkpoint_every()),
        "model": {
            "base_iteration_s": 91.5,
            "formula": "modelled_s = B*(c_s/c_ckpt)*(steps_to_target+lost_steps)"
            " + B*sum(recovery_s)/c_ckpt, B = 91.5 s (paper's checkpointing iteration)",
        },
        "bench_model": BENCH_MODEL,
        "bench_pipeline": BENCH_PIPELINE,
        **tables,
        "cost_measurement": costs,
        "runs": runs,
    }
    print(tables["costs_text"])
    print()
    print(tables["table_text"])
    previous = RESULTS / "paper_table2.json"
    if previous.exists():  # the rows carried to the paper's sizes (table2_extrapolate.py) are kept
        extrapolated = json.loads(previous.read_text()).get("extrapolated")
        if extrapolated is not None:
            out["extrapolated"] = extrapolated
    write_json(RESULTS / "paper_table2.json", out)
    plot(runs, runs["seeds"][0], RESULTS / "paper_table2.png")
    write_notes(RESULTS / "paper_table2.md", out)
    print(f"wrote {RESULTS}/paper_table2.json, .png and .md")
    return out


def merge_runs(parts: list[dict]) -> dict:
    """Runs files of separate processes (e.g. one per seed) as one; for each (rate, strategy, seed) the first file
    that has the run wins, unless that run never started (its stages timed out) and a later one did. Each part's seeds, loads and niceness are kept under `parts`."""
    merged = {**parts[0], "reference": [], "runs": {}, "parts": []}
    chosen: dict[tuple, dict] = {}
    for part in parts:
        merged["parts"].append(
            {k: part.get(k) for k in ("seeds", "load_before", "load_after", "total_wall_s")}
            | {"niceness": part.get("machine", {}).get("niceness")}
        )
        for rate, runs in [("0%", part["reference"]), *part["runs"].items()]:
            for run in runs:
                key = (rate, run["strategy"], run["seed"])
                never_started = key in chosen and chosen[key]["executed_steps"] == 0 and chosen[key]["error"]
                if key not in chosen or (never_started and run["executed_steps"] > 0):
                    chosen[key] = run
    for rate in ["0%", *PAPER_P]:  # the paper's order of rates, whatever order the files ran them in
        for (run_rate, _, _), run in chosen.items():
            if run_rate == rate:
                (merged["reference"] if rate == "0%" else merged["runs"].setdefault(rate, [])).append(run)
    merged["seeds"] = sorted({run["seed"] for run in merged["reference"]})
    merged["load_before"] = [p["load_before"] for p in merged["parts"]]
    merged["load_after"] = [p["load_after"] for p in merged["parts"]]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "part", choices=["costs", "interleaved", "runs", "report", "all"], nargs="?", default="all"
    )
    parser.add_argument(
        "--quick", action="store_true", help="One seed, shorter cost runs and an easier target."
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="Seeds (default 0 1 2; quick: 0).")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES, help="Strategies besides none.")
    parser.add_argument(
        "--rates",
        nargs="*",
        default=list(PAPER_P),
        choices=list(PAPER_P),
        help="runs: failure rates, in this order.",
    )
    parser.add_argument("--target", type=float, default=None, help="Target validation loss (2.5; quick 2.7).")
    parser.add_argument("--work", type=Path, default=WORK, help="Where costs.json and runs.json are kept.")
    parser.add_argument(
        "--runs-files",
        type=Path,
        nargs="*",
        default=None,
        help="report: runs.json files of separate processes to merge (default: the work dir's).",
    )
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    target = args.target or (2.7 if args.quick else 2.5)
    max_steps = 200 if args.quick else 300  # about 3x the steps the no-failure run needs
    if args.part in ("costs", "all"):
        measure_costs(seeds, args.strategies, args.quick, args.work)
    if args.part in ("interleaved", "all"):
        measure_interleaved(seeds, args.strategies, strategy_every, checkpoint_every(), args.work)
    if args.part in ("runs", "all"):
        measure_runs(seeds, args.strategies, target, max_steps, args.quick, args.work, args.rates)
    if args.part in ("report", "all"):
        files = args.runs_files or [args.work / "runs.json"]
        costs = json.loads((args.work / "costs.json").read_text())
        if (args.work / "interleaved.json").exists():
            costs["interleaved"] = json.loads((args.work / "interleaved.json").read_text())
        report(costs, merge_runs([json.loads(path.read_text()) for path in files]))


if __name__ == "__main__":
    main()
