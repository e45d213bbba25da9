"""The paper's Table 2 in shape: time to a target validation loss per strategy and failure rate.

`python benchmarks/paper_table2.py [--quick] [--seeds 0 1]` trains the same small LLaMa with the same
seeds under none (no failures, the reference), checkpoint, redundant, checkfree and checkfree+, with
stage kills drawn at the paper's three failure rates, until `target_val_loss`. Checkpoints go to a real
SeaweedFS S3 server on loopback. It prints the table, writes benchmarks/results/paper_table2.json and
benchmarks/results/paper_table2_loss_vs_time.png. Quote ratios (speed-ups), not absolute times.

Scaling (stated in the JSON too): the paper's per-step probabilities 0.0009 / 0.002 / 0.004 (5 / 10 /
16 % per hour at ~91 s per iteration) give about 0.7 / 1.6 / 3.2 failures in our ~200 steps on 4 stages,
so they are multiplied by FAILURE_SCALE and the checkpoint interval (100 in the paper) is divided by
it, which keeps the 5:10:16 ratios and the expected lost work per failure relative to the interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ray
from _common import machine_info, write_json

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.train import train_loop
from schemas.errors import LcscCheckfreeError
from schemas.train import TrainSpec

RESULTS = Path(__file__).parent / "results"
PAPER_P = {"5%": 0.0009, "10%": 0.002, "16%": 0.004}  # per stage per iteration (paper, Table 2 setting)
FAILURE_SCALE = 5.0
PAPER_CHECKPOINT_EVERY = 100
STRATEGIES = ["checkpoint", "redundant", "checkfree", "checkfree+"]
COLORS = {"checkpoint": "tab:green", "redundant": "tab:red", "checkfree": "tab:blue", "checkfree+": "tab:orange"}
# The paper's setting (500M LLaMa, 6 stages): seconds per iteration and per recovery.
PAPER_ITER_S = {"none": 91.5, "checkpoint": 91.5, "redundant": 151.0, "checkfree": 91.5, "checkfree+": 91.5}
PAPER_RECOVERY_S = 30.0
BENCH_MODEL = {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64}
BENCH_PIPELINE = {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 8, "num_cpus_per_stage": 0.4,
                  "warm_standby": True}




def bench_spec(strategy: str, seed: int, steps: int, target: float | None, **extra) -> TrainSpec:
    """The benchmark's model and pipeline with `strategy`; `extra` merges into sections."""
    data = {"name": f"table2-{strategy}", "seed": seed, "steps": steps, "eval_every": 10, "eval_batches": 2,
            "target_val_loss": target, "model": BENCH_MODEL, "pipeline": BENCH_PIPELINE, "optim": {"lr": 3e-3},
            "recovery": {"strategy": strategy}}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainSpec.model_validate(data)


def run_one(spec: TrainSpec, checkpoint_uri: str | None = None) -> dict:
    """Train in this process's Ray; returns the measurements of one run (never raises on a failed run)."""
    executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
    error = None
    try:
        executor.start()
        train_loop(executor)
    except (LcscCheckfreeError, ray.exceptions.RayError) as exc:  # an unrecoverable run is a result
        error = f"{type(exc).__name__}: {exc}"
    finally:
        elapsed = time.monotonic() - executor.start_time
        executor.shutdown()
    h = executor.history
    target = spec.target_val_loss
    reached = bool(target is not None and h.val_losses and h.val_losses[-1] <= target)
    recoveries = len({(f.step, f.rolled_back_to) for f in h.failures})  # simultaneous losses: one recovery
    return {
        "strategy": spec.recovery.strategy, "seed": spec.seed, "reached": reached, "error": error,
        "executed_steps": len(h.steps), "last_step": h.steps[-1] if h.steps else 0,
        "wall_s": elapsed, "median_step_s": statistics.median(h.step_times) if h.step_times else None,
        "failures": [f.model_dump() for f in h.failures], "recoveries": recoveries,
        "recovery_s_total": sum(f.recovery_s for f in h.failures),
        "rolled_back_steps": sum(_lost_steps(f) for f in h.failures),
        "checkpoint_save_s_total": h.costs.get("checkpoint_save_s_total", 0.0),
        "val_steps": h.val_steps, "val_losses": h.val_losses,
        "val_wall_s": _val_times(h), "final_val_loss": h.val_losses[-1] if h.val_losses else None,
        "costs": dict(h.costs),
    }


def _lost_steps(failure) -> int:
    return failure.step - failure.rolled_back_to - 1 if failure.rolled_back_to is not None else 0


def _val_times(h) -> list[float]:
    """Wall time of each evaluation: that of the step committed just before it (step numbers repeat after a
    rollback, so walk the history in order)."""
    times, i = [], 0
    for val_step in h.val_steps:
        while i < len(h.steps) and h.steps[i] != val_step:
            i += 1
        times.append(h.wall_times[i] if i < len(h.steps) else float("nan"))
        i += 1
    return times


def modelled_hours(run: dict) -> float:
    """Steps x the paper's seconds per iteration + 30 s per recovery (rolled-back steps are in the steps)."""
    return (run["executed_steps"] * PAPER_ITER_S[run["strategy"]] + run["recoveries"] * PAPER_RECOVERY_S) / 3600


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of each measure; None where a seed did not reach the target."""
    ok = [r for r in runs if r["reached"]]
    mean = (lambda key: statistics.mean(r[key] for r in ok)) if len(ok) == len(runs) else (lambda key: None)
    return {"seeds": [r["seed"] for r in runs], "reached_all": len(ok) == len(runs), "reached": f"{len(ok)}/{len(runs)}",
            "steps": mean("executed_steps"), "wall_s": mean("wall_s"),
            "s_per_step": statistics.mean(r["median_step_s"] for r in runs if r["median_step_s"]),
            "failures": statistics.mean(len(r["failures"]) for r in runs),
            "recovery_s": statistics.mean(r["recovery_s_total"] for r in runs),
            "rolled_back_steps": statistics.mean(r["rolled_back_steps"] for r in runs),
            "modelled_h": statistics.mean(modelled_hours(r) for r in ok) if len(ok) == len(runs) else None}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def format_table(table: dict, reference: dict) -> str:
    """Rows per failure rate and strategy, like the paper's Table 2, speed-ups against checkpoint."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    head = (f"{'rate':<5} {'strategy':<11} {'reach':>5} {'fail':>5} {'steps':>6} {'wall s':>7} {'x ckpt':>6} {'s/step':>7} "
            f"{'rec s':>6} {'model h':>8} {'x ckpt':>6}")
    lines = [head, "-" * len(head)]
    lines.append(f"{'0%':<5} {'none':<11} {reference['reached']:>5} {0:>5} {fmt(reference['steps'], '.0f'):>6} "
                 f"{fmt(reference['wall_s'], '.1f'):>7} {'':>6} {reference['s_per_step']:>7.3f} {'':>6} "
                 f"{fmt(reference['modelled_h'], '.1f'):>8}")
    for rate, rows in table.items():
        ckpt = rows.get("checkpoint", {"wall_s": None, "modelled_h": None})
        for strategy, row in rows.items():
            lines.append(
                f"{rate:<5} {strategy:<11} {row['reached']:>5} {row['failures']:>5.1f} {fmt(row['steps'], '.0f'):>6} "
                f"{fmt(row['wall_s'], '.1f'):>7} {fmt(_ratio(ckpt['wall_s'], row['wall_s']), '.2f'):>6} "
                f"{row['s_per_step']:>7.3f} {row['recovery_s']:>6.1f} {fmt(row['modelled_h'], '.1f'):>8} "
                f"{fmt(_ratio(ckpt['modelled_h'], row['modelled_h']), '.2f'):>6}")
    return "\n".join(lines)


def plot(results: dict, seed: int, path: Path) -> None:
    """Validation loss against wall time per strategy, one panel per failure rate (first seed)."""
    rates = list(results["runs"])
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), dpi=100, sharey=True)
    for ax, rate in zip(axes, rates):
        ref = next(r for r in results["reference"] if r["seed"] == seed)
        ax.plot(ref["val_wall_s"], ref["val_losses"], "k--", lw=1, label="none (no failures)")
        for run in results["runs"][rate]:
            if run["seed"] == seed:
                ax.plot(run["val_wall_s"], run["val_losses"], "-", lw=1.2, label=run["strategy"],
                        color=COLORS[run["strategy"]])
        ax.axhline(results["target_val_loss"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"failure rate {rate} (p x{FAILURE_SCALE:g}), seed {seed}")
        ax.set_xlabel("wall time (s)")
    axes[0].set_ylabel("validation loss (nats/byte)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def collect(seeds: list[int], target: float, max_steps: int, every: int, quick: bool) -> dict:
    """Every run, side by side in one Ray, with checkpoints on a SeaweedFS server started (and stopped) here."""
    from rayops.s3_server import start_seaweedfs

    server = start_seaweedfs(Path(tempfile.mkdtemp(prefix="table2-s3-")))
    os.environ.update(server.env())
    bucket = f"table2-{uuid.uuid4().hex[:8]}"
    server.create_bucket(bucket)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    out: dict = {"target_val_loss": target, "seeds": seeds, "quick": quick, "max_steps": max_steps,
                 "reference": [], "runs": {}}
    try:
        for seed in seeds:
            print(f"seed {seed}: none (no failures)", flush=True)
            out["reference"].append(run_one(bench_spec("none", seed, max_steps, target)))
            for index, (rate, p) in enumerate(PAPER_P.items()):
                order = STRATEGIES[index % 4:] + STRATEGIES[: index % 4]  # rotate to spread machine noise
                for strategy in order:
                    spec = bench_spec(strategy, seed, max_steps, target, checkpointing={"every": every},
                                      failures={"probability_per_step": p * FAILURE_SCALE, "seed": seed})
                    run = run_one(spec, checkpoint_uri=f"s3://{bucket}/{rate}/{strategy}/{seed}")
                    out["runs"].setdefault(rate, []).append(run)
                    out["total_wall_s"] = time.monotonic() - started
                    Path(tempfile.gettempdir(), "paper_table2_runs.json").write_text(json.dumps(out, default=str))
                    print(f"seed {seed} {rate} {strategy}: reached={run['reached']} steps={run['executed_steps']} "
                          f"wall={run['wall_s']:.1f}s failures={len(run['failures'])} {run['error'] or ''}",
                          flush=True)
    finally:
        ray.shutdown()
        server.stop()
    return out


def report(out: dict, every: int) -> None:
    """Summarise the runs, print the table, write the JSON and the plot."""
    reference = summarise(out["reference"])
    table = {rate: {s: summarise([r for r in runs if r["strategy"] == s]) for s in STRATEGIES
                    if any(r["strategy"] == s for r in runs)} for rate, runs in out["runs"].items()}
    out.update(table=table, reference_summary=reference)
    out["scaling"] = {
        "paper_probability_per_step": PAPER_P, "failure_scale": FAILURE_SCALE,
        "probability_per_step": {r: p * FAILURE_SCALE for r, p in PAPER_P.items()},
        "checkpoint_every": every, "paper_checkpoint_every": PAPER_CHECKPOINT_EVERY,
        "fallback": f"checkfree, checkfree+ and redundant also checkpoint every {every} steps, as their fallback "
                    "for losses they cannot rebuild (checkfree: outer stages; all: adjacent stages together)",
        "modelled": f"executed steps x paper s/iteration {PAPER_ITER_S} + {PAPER_RECOVERY_S:g} s per recovery",
    }
    out["machine"] = machine_info(torch_threads_per_stage=1, max_steps=out.get("max_steps"), model=BENCH_MODEL, pipeline=BENCH_PIPELINE)
    seeds_note = [out["seeds_note"]] if "seeds_note" in out else []
    out["notes"] = seeds_note + NOTES + auto_notes(table, reference)
    text = format_table(table, reference)
    print(text)
    out["table_text"] = text
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "paper_table2.json", out)
    plot(out, out["seeds"][0], RESULTS / "paper_table2_loss_vs_time.png")
    print(f"wrote {RESULTS / 'paper_table2.json'} and paper_table2_loss_vs_time.png "
          f"({out.get('total_wall_s', 0.0) / 60:.1f} min of runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One seed and an easier target (~5 minutes).")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="Seeds (default 0 1; quick: 0).")
    parser.add_argument("--target", type=float, default=None, help="Target validation loss.")
    parser.add_argument("--from-runs", default=None, help="Rebuild the table from a saved runs file "
                        "(the temp dir's paper_table2_runs.json, written after every run) without training.")
    args = parser.parse_args()
    every = round(PAPER_CHECKPOINT_EVERY / FAILURE_SCALE)
    if args.from_runs:
        report(json.loads(Path(args.from_runs).read_text()), every)
        return
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    target = args.target or (2.7 if args.quick else 2.5)
    max_steps = 200 if args.quick else 300  # about 3x the steps the no-failure run needs
    report(collect(seeds, target, max_steps, every, args.quick), every)




PAPER_SPEEDUP_CHECKFREE_PLUS = {"5%": 1.57, "10%": 1.69, "16%": 1.38}  # hours, CheckFree+ vs checkpointing
NOTES = [
    ("Scale: a 4-stage, d=64 byte-level LLaMa trained for ~100-300 steps on 2 shared CPU cores, against a 500M, "
    "6-stage model trained for ~20k iterations on GPUs in the paper. Failure probabilities x5 and checkpoint "
    "interval /5 (see scaling); each run still sees only a handful of failures, so seed-to-seed variation is large."),
    ("Measured per-step costs differ from the paper's: our 'redundant' keeps each successor's state (weights and "
    "Adam) current by copying it every step through the object store (Bamboo-style memory/traffic), it does not "
    "recompute the neighbour's layers, so its overhead is a copy, not the paper's ~65% extra compute; "
    "checkpoint saves of a tiny model to a loopback S3 take milliseconds, not minutes."),
    ("Measured recoveries add 2-20 s of wall time per run here (2-8 failures; actor start-up and state transfer "
    "on 2 cores) against steps of ~0.12-0.15 s, so one recovery costs tens of steps of wall time and the measured "
    "wall ratios stay near 1; in the paper 30 s is a third of one 91 s iteration. The 'modelled' column puts our "
    "step counts into the paper's costs to show the shape at that scale."),
    ("With 4 stages, half of the stages are outer stages: plain CheckFree cannot rebuild them and rolls back to "
    "the last checkpoint, so it behaves like checkpointing for about half of the failures (the paper has 6 stages, "
    "4 of them middle ones). CheckFree+ copies the outer stages from their swap partners."),
    ("Steps: CheckFree+ reached the target 0-20 steps after the run without failures (80 and 70 steps for seeds 0 "
     "and 1); redundant recovery is exact. Its rebuilds cost few extra steps here (see also "
     "recovery_ablation.json), so unlike the paper its advantage over checkpointing grows at 16% instead of "
     "shrinking (paper 1.38x): at this size and early in training a rebuilt stage barely hurts, while the paper's "
     "CheckFree+ needs noticeably more iterations at 16%."),
]


def auto_notes(table: dict, reference: dict) -> list[str]:
    """Where this run's ranking agrees or disagrees with the paper's Table 2."""
    seeds = sorted({seed for rows in table.values() for row in rows.values() for seed in row["seeds"]})
    notes = [(f"Rows average over the seeds in table[rate][strategy]['seeds'] (all seeds run: {seeds}); "
             "the 'reach' column counts the seeds that reached the target within max_steps.")]
    for rate, rows in table.items():
        if not {"checkpoint", "checkfree+", "redundant", "checkfree"} <= set(rows):
            continue
        ckpt, plus = rows["checkpoint"]["wall_s"], rows["checkfree+"]["wall_s"]
        measured = _ratio(ckpt, plus)
        modelled = _ratio(rows["checkpoint"]["modelled_h"], rows["checkfree+"]["modelled_h"])
        fmt = lambda v: "n/a (a seed did not reach the target)" if v is None else f"{v:.2f}x"
        notes.append(f"{rate}: CheckFree+ vs checkpoint, measured wall {fmt(measured)}, modelled {fmt(modelled)}; "
                     f"paper {PAPER_SPEEDUP_CHECKFREE_PLUS[rate]:.2f}x.")
        red, cf = rows["redundant"]["modelled_h"], rows["checkfree"]["modelled_h"]
        if red and cf:
            notes.append(f"{rate}: modelled CheckFree vs redundant {red / cf:.2f}x (paper: CheckFree >=12% faster "
                         "at 5-10%, redundant faster at 16%).")
    return notes


if __name__ == "__main__":
    main()
