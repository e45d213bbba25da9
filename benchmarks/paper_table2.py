"""The paper's Table 2 with an honest cost model: time to a target validation loss per strategy and failure rate.

Three measurements, each a sweep of the benchmark harness (configs x seeds, rows cached under outputs/bench/rows/
as they are measured, so a killed run measures only the rows it lacks), and a report:

    python benchmarks/paper_table2.py costs [--quick]          # per-step and recovery costs, no failures drawn
    python benchmarks/paper_table2.py interleaved [--quick]    # per-step costs from interleaved blocks
    nice -n 10 python benchmarks/paper_table2.py runs [--quick] # time to target under drawn stage kills
    python benchmarks/paper_table2.py report [--quick]         # table, JSON, PNG and Markdown from the measured data

(`all`, the default, runs the four in a row.) A measurement writes its measured data into the results JSON
(`cost_measurement`, `runs`) and reports when the JSON holds both; `report` regenerates the tables, the PNG and
the Markdown from the JSON's measured data alone. Separate processes (`runs --seeds 1`, `runs --seeds 2`) share
the row cache: `runs --seeds 1 2` afterwards measures nothing and writes both. `--quick` (one seed, shorter cost
runs, an easier target, the 16% rate only) writes under outputs/bench/quick/.

Runtime, measured on 2 shared cores: `costs --quick` (one seed, 6 runs) 4 min at load 6-23; a full cost round
~7 min per seed at load 3-6 and 12-20 min at load 80-100; `interleaved` about 3 minutes per seed; `runs` 1-2 min
per run at load 3 (2 seeds x 13 runs took 14 min) and 3-7 min per run at load 80-100, where stage start-up alone
can take minutes; report seconds. Default seeds 0 1 2.

**costs** trains each strategy (none, checkpoint, redundant, checkfree, checkfree+, hybrid; `--strategies` picks)
side by side in paired rounds, one round per seed in a rotated order, without drawn failures: the mean wall
time per committed step over a fixed window (CheckFree+'s swap and (de)embedding copies, redundant
computation's replication and checkpointing's save stall are all in it), then four scheduled kills (a middle
stage and an outer one, each with a warm standby ready and again while the standby is still starting) whose
extra wall time is each recovery's cost (detection + rebuild + retried step), by method and warm/cold.

**interleaved** (`table2_interleaved.py`): blocks of steps of every strategy interleaved in one round, per-step
costs the machine's drift cannot bias; when measured, the report takes per-step costs from it.

**runs** trains each strategy under stage kills drawn at the paper's three failure rates until the target,
checking it every 5 steps; checkpoints go to a real SeaweedFS S3 server on loopback.

**report** applies the measured *relative* costs to one base iteration time (the paper's checkpointing 91.5 s),
the same way for every strategy (`table2_model.py`):

    modelled_s = 91.5 * (c_s / c_ckpt) * (steps_to_target + lost_steps) + 91.5 * sum(recovery_s) / c_ckpt

and prints the measured wall-clock speed-ups over checkpointing and the modelled ones, with 95% intervals over
the seeds (`rayops.paired`). Writes benchmarks/results/paper_table2.json, .png and .md (notes generated from the
values).

Failure model: stage s dies at step t when u(failures.seed, t)[s] < p (the failure stream of the seed, apart
from data order and weights). The paper's per-step p (5/10/16 % per stage per hour at 91.5 s per iteration:
0.0009/0.002/0.004) gives under one failure in our ~100 steps, so p is multiplied by FAILURE_SCALE and the
checkpoint interval (the paper's 100) divided by it. p is per step, the same for every strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import harness
from _common import machine_info, write_json
from checkfree_setup import BENCH_MODEL, BENCH_PIPELINE, EVAL_EVERY, bench_spec, cost_run, run_one
from table2_interleaved import ROUNDS, interleaved_section, interleaved_sweep
from table2_measure import LazyCluster, without_harness_keys
from table2_notes import costs_by_seed, notes_sections, report_tables

NAME = "paper_table2"
PAPER_P = {"5%": 0.0009, "10%": 0.002, "16%": 0.004}  # per stage per iteration (paper, Table 2 setting)
FAILURE_SCALE = 5.0
PAPER_CHECKPOINT_EVERY = 100
STRATEGIES = ["checkpoint", "redundant", "checkfree", "checkfree+", "hybrid"]
QUICK_RATES = ["16%"]
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
    "full": {"window": [3, 42], "kills": [[45, 1], [48, 0], [75, 0], [78, 1]], "steps": 90},
    "quick": {"window": [3, 22], "kills": [[25, 1], [27, 0], [45, 0], [47, 1]], "steps": 50},
}
START_RETRIES = 2
REFERENCE = "0%"  # the no-failure runs' rate


def checkpoint_every() -> int:
    """The scaled checkpoint interval (every strategy's fallback, and checkpointing itself)."""
    return round(PAPER_CHECKPOINT_EVERY / FAILURE_SCALE)


def strategy_every(strategy: str) -> int | None:
    """`checkpointing.every` of a strategy's runs: the scaled interval, except for hybrid, whose interval
    Young/Daly sets from its measured save cost and the failure rate (`checkfree_ray/hybrid.py`; the spec's
    `failures.probability_per_step` is its prior), bounded only by the default 1000 steps."""
    return None if strategy == "hybrid" else checkpoint_every()


# ----- costs ------------------------------------------------------------------------------------------------------
def cost_sweep(seeds: list[int], strategies: list[str], quick: bool, cluster: LazyCluster) -> harness.Sweep:
    """Paired cost rounds: none and every strategy on each seed, the order rotated from seed to seed."""
    layout = COST_LAYOUT["quick" if quick else "full"]
    configs = {}
    for strategy in ["none", *strategies]:
        none = strategy == "none"
        configs[strategy] = {
            "window": layout["window"],
            "kills": [] if none else layout["kills"],
            "steps": layout["window"][1] if none else layout["steps"],
            "every": None if none else strategy_every(strategy),
        }

    def measure(strategy: str, config: dict, seed: int) -> dict:
        base = cluster.base()
        row = cost_run(
            strategy,
            seed,
            tuple(config["window"]),
            [tuple(kill) for kill in config["kills"]],
            config["steps"],
            config["every"],
            None if strategy == "none" else f"{base}/{strategy}/{seed}",
        )
        print(f"costs seed {seed} {strategy}: {row['wall_s']:.1f}s {row['error'] or ''}", flush=True)
        return row

    return harness.Sweep(f"{NAME}_costs", configs, seeds, measure, rotate=True)


# ----- runs -------------------------------------------------------------------------------------------------------
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


def runs_sweep(
    seeds: list[int],
    strategies: list[str],
    rates: list[str],
    target: float,
    max_steps: int,
    cluster: LazyCluster,
) -> harness.Sweep:
    """Per seed: the no-failure reference, then every strategy at every rate (rotated from rate to rate)."""
    configs = {
        f"{REFERENCE}/none": {"rate": REFERENCE, "strategy": "none", "target": target, "steps": max_steps}
    }
    for index, rate in enumerate(rates):
        k = index % len(strategies)
        for strategy in strategies[k:] + strategies[:k]:
            configs[f"{rate}/{strategy}"] = {
                "rate": rate,
                "strategy": strategy,
                "target": target,
                "steps": max_steps,
                "every": strategy_every(strategy),
                "probability_per_step": PAPER_P[rate] * FAILURE_SCALE,
            }

    def measure(name: str, config: dict, seed: int) -> dict:
        base = cluster.base()
        strategy, rate = config["strategy"], config["rate"]
        if rate == REFERENCE:
            print(f"seed {seed}: none (no failures)", flush=True)
            return run_started(bench_spec("none", seed, config["steps"], config["target"]), None)
        spec = bench_spec(
            strategy,
            seed,
            config["steps"],
            config["target"],
            checkpointing={"every": config["every"]},
            failures={"probability_per_step": config["probability_per_step"], "seed": seed},
        )
        run = run_started(spec, f"{base}/{rate}/{strategy}/{seed}")
        print(
            f"seed {seed} {rate} {strategy}: reached={run['reached']} at {run['steps_to_target']} "
            f"executed={run['executed_steps']} wall={run['wall_s']:.1f}s "
            f"recoveries={run['recovery_methods']} {run['error'] or ''}",
            flush=True,
        )
        return run

    return harness.Sweep(f"{NAME}_runs", configs, seeds, measure)


def merge_runs(parts: list[dict]) -> dict:
    """Runs of separate measurements (e.g. one per seed) as one; for each (rate, strategy, seed) the first part
    that has the run wins, unless that run never started (its stages timed out) and a later one did. Each part's
    seeds, loads and niceness are kept under `parts`."""
    merged = {**parts[0], "reference": [], "runs": {}, "parts": []}
    chosen: dict[tuple, dict] = {}
    for part in parts:
        merged["parts"].append(
            {k: part.get(k) for k in ("seeds", "load_before", "load_after", "total_wall_s")}
            | {"niceness": part.get("machine", {}).get("niceness")}
        )
        for rate, runs in [(REFERENCE, part["reference"]), *part["runs"].items()]:
            for run in runs:
                key = (rate, run["strategy"], run["seed"])
                never_started = key in chosen and chosen[key]["executed_steps"] == 0 and chosen[key]["error"]
                if key not in chosen or (never_started and run["executed_steps"] > 0):
                    chosen[key] = run
    for rate in [REFERENCE, *PAPER_P]:  # the paper's order of rates, whatever order the parts ran them in
        for (run_rate, _, _), run in chosen.items():
            if run_rate == rate:
                (merged["reference"] if rate == REFERENCE else merged["runs"].setdefault(rate, [])).append(
                    run
                )
    merged["seeds"] = sorted({run["seed"] for run in merged["reference"]})
    merged["load_before"] = [p["load_before"] for p in merged["parts"]]
    merged["load_after"] = [p["load_after"] for p in merged["parts"]]
    return merged


# ----- measured data -> the results JSON --------------------------------------------------------------------------
def cost_section(rows: list[dict], quick: bool, part: dict, interleaved: dict | None) -> dict:
    """The `cost_measurement` section: the cost rows with their layout and the machine they ran on."""
    layout = COST_LAYOUT["quick" if quick else "full"]
    section = {
        "layout": layout,
        "checkpoint_every": checkpoint_every(),
        "load_before": part["load_before"],
        "rows": [without_harness_keys(row) for row in rows],
        "machine": part["machine"],
        "load_after": part["load_after"],
        "total_wall_s": part["total_wall_s"],
    }
    if interleaved is not None:
        section["interleaved"] = interleaved
    return section


def runs_section(
    rows: list[dict], seeds: list[int], rates: list[str], target: float, max_steps: int, part: dict
) -> dict:
    """The `runs` section: the reference and each rate's runs, in the order measured."""
    runs: dict = {"reference": [], "runs": {}}
    for row in rows:
        run = without_harness_keys(row)
        rate = row["config"].split("/")[0]
        (runs["reference"] if rate == REFERENCE else runs["runs"].setdefault(rate, [])).append(run)
    measured = {
        "target_val_loss": target,
        "seeds": seeds,
        "rates": rates,
        "quick": part["quick"],
        "max_steps": max_steps,
        "eval_every": EVAL_EVERY,
        **runs,
        "load_before": part["load_before"],
        "machine": part["machine"],
        "total_wall_s": part["total_wall_s"],
        "load_after": part["load_after"],
    }
    return merge_runs([measured])


def measured_data(out: Path) -> dict:
    """The measured sections (`cost_measurement`, `runs`, `extrapolated`) of the results JSON in `out`, if any."""
    path = out / f"{NAME}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("cost_measurement", "runs", "extrapolated") if k in data}


# ----- report -----------------------------------------------------------------------------------------------------
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_rows(runs: dict) -> list[dict]:
    """One row per run (config 'rate/strategy', seed): the per-seed values the table's intervals are drawn from."""
    keys = ("reached", "steps_to_target", "executed_steps", "recoveries", "train_wall_s")
    return [
        {"config": f"{rate}/{run['strategy']}", "seed": run["seed"]}
        | {k: run.get(k) for k in (*keys, "modelled_h", "modelled_h_paper_recovery")}
        for rate, group in [(REFERENCE, runs["reference"]), *runs["runs"].items()]
        for run in group
    ]


def report(args: argparse.Namespace, record: dict, measured: dict) -> Path:
    """The tables from the measured data, printed; the JSON, PNG and Markdown written through the harness."""
    costs, runs = measured["cost_measurement"], measured["runs"]
    per_seed = costs_by_seed(costs)
    tables = report_tables(per_seed, runs, costs["median_step_s"])
    out = {
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
    if "extrapolated" in measured:  # the rows carried to the paper's sizes (table2_extrapolate.py) are kept
        out["extrapolated"] = measured["extrapolated"]
    print(tables["costs_text"])
    print()
    print(tables["table_text"])
    results = harness.results_dir(args)
    plot(runs, runs["seeds"][0], results / f"{NAME}.png")
    sweep = harness.Sweep(
        NAME,
        configs={row["config"]: None for row in run_rows(runs)},
        seeds=runs["seeds"],
        measure=lambda *_: None,
        extra=out,
    )
    title, sections = notes_sections(out)
    return harness.finish(sweep, args, record, run_rows(runs), title=title, sections=sections)


# ----- CLI --------------------------------------------------------------------------------------------------------
def begin() -> dict:
    """The start of a measurement: its clock and the machine's load."""
    return {"started": time.monotonic(), "load_before": machine_info()["load_average"]}


def ended(begun: dict, quick: bool) -> dict:
    """A measurement's machine, loads before and after, and wall time (as the measured sections keep them)."""
    machine = machine_info(torch_threads_per_stage=1, niceness=os.nice(0))
    return {
        "load_before": begun["load_before"],
        "load_after": machine["load_average"],
        "machine": machine,
        "total_wall_s": time.monotonic() - begun["started"],
        "quick": quick,
    }


def main(argv: list[str] | None = None) -> None:
    cli = harness.parser(__doc__, seeds=[0, 1, 2], quick_seeds=[0])
    cli.add_argument(
        "part", choices=["costs", "interleaved", "runs", "report", "all"], nargs="?", default="all"
    )
    cli.add_argument("--strategies", nargs="+", default=STRATEGIES, help="Strategies besides none.")
    cli.add_argument(
        "--rates", nargs="+", default=None, choices=list(PAPER_P), help="runs: failure rates, in this order."
    )
    cli.add_argument("--target", type=float, default=None, help="Target validation loss (2.5; quick 2.7).")
    args = cli.parse_args(argv)
    seeds, quick, part = harness.chosen_seeds(args), args.quick, args.part
    target = args.target or (2.7 if quick else 2.5)
    max_steps = 200 if quick else 300  # about 3x the steps the no-failure run needs
    rates = args.rates or (QUICK_RATES if quick else list(PAPER_P))
    results = harness.results_dir(args)
    measured = measured_data(results)
    record = harness.run_record(args)
    if part == "interleaved" and "cost_measurement" not in measured:
        cli.error(
            f"`interleaved` adds to the cost rounds' data: run `costs` first (no measured costs in {results})"
        )
    if part in ("costs", "all"):
        begun = begin()
        with LazyCluster("costs") as cluster:
            rows = harness.run_sweep(
                cost_sweep(seeds, args.strategies, quick, cluster), results, fresh=args.fresh
            )
        kept = measured.get("cost_measurement", {}).get("interleaved") if part == "costs" else None
        measured["cost_measurement"] = cost_section(rows, quick, ended(begun, quick), kept)
    if part in ("interleaved", "all"):
        begun = begin()
        rounds = 2 if quick else ROUNDS
        with LazyCluster("interleaved") as cluster:
            sweep = interleaved_sweep(
                seeds, args.strategies, strategy_every, checkpoint_every(), rounds, cluster
            )
            rows = harness.run_sweep(sweep, results, fresh=args.fresh)
        measured["cost_measurement"]["interleaved"] = interleaved_section(sweep, rows, begun)
    if part in ("runs", "all"):
        begun = begin()
        with LazyCluster("table2") as cluster:
            sweep = runs_sweep(seeds, args.strategies, rates, target, max_steps, cluster)
            rows = harness.run_sweep(sweep, results, fresh=args.fresh)
        measured["runs"] = runs_section(rows, seeds, rates, target, max_steps, ended(begun, quick))
    missing = [k for k in ("cost_measurement", "runs") if k not in measured]
    if not missing:
        report(args, record, measured)
    elif part == "report":
        cli.error(f"no measured {missing} in {results / NAME}.json: run `costs` and `runs` first")
    else:
        path = write_json(results / f"{NAME}.json", {"benchmark": NAME, **record, **measured})
        print(
            f"wrote the measured data to {path}; {missing} not measured yet: run `costs` / `runs` to report"
        )


if __name__ == "__main__":
    main()
