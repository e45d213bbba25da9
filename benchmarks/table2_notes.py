"""Table 2's report: measured costs per seed, modelled times, the tables, and notes generated from the values."""

from __future__ import annotations

import statistics

from _common import markdown_table
from checkfree_setup import recovery_kind
from table2_interleaved import interleaved_step_s, round_ratios
from table2_model import (
    PAPER_BASE_ITER_S,
    PAPER_RECOVERY_S,
    StrategyCosts,
    format_interval,
    modelled_seconds,
    recovery_seconds,
    seed_interval,
    speedup_verdict,
    speedups,
    step_intervals,
    step_seconds,
)

from rayops.paired import PairedDifference

PAPER_SPEEDUP_CHECKFREE_PLUS = {"5%": 1.57, "10%": 1.69, "16%": 1.38}  # hours, CheckFree+ vs checkpointing


def costs_by_seed(costs: dict) -> dict[int, dict[str, StrategyCosts]]:
    """Each cost round's StrategyCosts per seed and strategy (rows that failed are left out)."""
    window = tuple(costs["layout"]["window"])
    out: dict[int, dict[str, StrategyCosts]] = {}
    medians: dict[int, dict[str, float]] = {}
    for row in costs["rows"]:
        if row["error"]:
            continue
        step_s = step_seconds(row["steps"], row["wall_times"], window)
        by_method: dict[str, list[float]] = {}
        for failure in row["failures"]:
            offset = row["kill_offsets"].get(f"{failure['step']}:{failure['stage']}")
            if offset is None:
                continue
            by_method.setdefault(recovery_kind(failure), []).append(
                recovery_seconds(row["wall_times"], offset, step_s)
            )
        out.setdefault(row["seed"], {})[row["strategy"]] = StrategyCosts(
            step_s, {m: statistics.mean(v) for m, v in by_method.items()}
        )
        medians.setdefault(row["seed"], {})[row["strategy"]] = statistics.median(
            step_intervals(row["steps"], row["wall_times"], window)
        )
    costs["median_step_s"] = medians  # a load-robust check of the means, kept beside them
    if costs.get(
        "interleaved"
    ):  # per-step costs from interleaved blocks replace the sequential rounds' means
        for seed, by_strategy in interleaved_step_s(costs["interleaved"]).items():
            for strategy, step_s in by_strategy.items():
                kept = out.setdefault(seed, {}).get(strategy)
                # a recovery keeps its length in its own run's steps (both measured in that run, so the drift
                # between sequential rounds cancels), converted to seconds at the interleaved step time
                scale = step_s / kept.step_s if kept else 1.0
                out[seed][strategy] = StrategyCosts(
                    step_s, {m: r * scale for m, r in kept.recovery_s.items()} if kept else {}
                )
                medians.setdefault(seed, {})[strategy] = statistics.median(
                    costs["interleaved"]["seeds"][str(seed)]["block_step_s"][strategy]
                )
    return out


def costs_for(
    per_seed: dict[int, dict[str, StrategyCosts]], seed: int, strategy: str
) -> StrategyCosts | None:
    """The seed's own cost round (paired), else the mean over the measured seeds; None if never measured."""
    if strategy in per_seed.get(seed, {}):
        return per_seed[seed][strategy]
    measured = [by[strategy] for by in per_seed.values() if strategy in by]
    if not measured:
        return None
    methods = {m for c in measured for m in c.recovery_s}
    return StrategyCosts(
        statistics.mean(c.step_s for c in measured),
        {m: statistics.mean(c.recovery_s[m] for c in measured if m in c.recovery_s) for m in methods},
    )


def modelled_hours(run: dict, per_seed: dict, fixed_recovery_s: float | None = None) -> float | None:
    """The run's modelled hours to target (None when it did not reach it or a cost is missing); with
    `fixed_recovery_s`, every recovery costs that many modelled seconds instead of its measured time."""
    costs = costs_for(per_seed, run["seed"], run["strategy"])
    ckpt = costs_for(per_seed, run["seed"], "checkpoint")
    if not run["reached"] or costs is None or ckpt is None:
        return None
    lost = run["executed_steps"] - run["steps_to_target"]
    return (
        modelled_seconds(
            run["steps_to_target"],
            lost,
            run["recovery_methods"],
            costs,
            ckpt.step_s,
            fixed_recovery_s=fixed_recovery_s,
        )
        / 3600
    )


def _cost_rows(per_seed: dict, medians: dict) -> tuple[list[str], list[list[str]], dict]:
    strategies = list(dict.fromkeys(s for by in per_seed.values() for s in by))
    seeds = sorted(per_seed)
    summary, rows = {}, []
    for strategy in strategies:
        pairs = [
            (per_seed[s][strategy], per_seed[s].get("checkpoint"), per_seed[s].get("none"))
            for s in seeds
            if strategy in per_seed[s]
        ]
        rel = seed_interval([c.step_s / k.step_s for c, k, _ in pairs if k])
        over_none = seed_interval([c.step_s / n.step_s for c, _, n in pairs if n])
        median_rel = seed_interval(
            [
                medians[s][strategy] / medians[s]["checkpoint"]
                for s in seeds
                if strategy in medians.get(s, {}) and "checkpoint" in medians.get(s, {})
            ]
        )
        methods = sorted({m for c, _, _ in pairs for m in c.recovery_s})
        rec = {
            m: seed_interval([c.recovery_s[m] / k.step_s for c, k, _ in pairs if k and m in c.recovery_s])
            for m in methods
        }
        summary[strategy] = {
            "step_ms": [c.step_s * 1e3 for c, _, _ in pairs],
            "step_vs_checkpoint": rel.__dict__,
            "step_vs_none": over_none.__dict__,
            "median_step_vs_checkpoint": median_rel.__dict__,
            "recovery_in_checkpoint_steps": {m: i.__dict__ for m, i in rec.items()},
            "recovery_s": {m: [c.recovery_s[m] for c, _, _ in pairs if m in c.recovery_s] for m in methods},
        }
        rows.append(
            [
                strategy,
                f"{statistics.mean(c.step_s for c, _, _ in pairs) * 1e3:.1f}",
                format_interval(rel, ".3f"),
                format_interval(over_none, ".3f"),
                format_interval(median_rel, ".3f"),
                "; ".join(f"{m} {format_interval(i, '.1f')}" for m, i in rec.items()) or "-",
            ]
        )
    header = [
        "strategy",
        "ms/step",
        "x checkpoint's step",
        "x no-failure step",
        "median x checkpoint's",
        "recovery (checkpoint steps)",
    ]
    return header, rows, summary


def _table_rows(runs: dict, per_seed: dict) -> tuple[list[str], list[list[str]], dict]:
    for run in runs["reference"] + [r for rs in runs["runs"].values() for r in rs]:
        run["modelled_h"] = modelled_hours(run, per_seed)
        run["modelled_h_paper_recovery"] = modelled_hours(run, per_seed, PAPER_RECOVERY_S)
    header = [
        "rate",
        "strategy",
        "reached",
        "steps to target",
        "lost steps",
        "recoveries",
        "wall s from step 1",
        "measured x ckpt",
        "modelled h",
        "modelled x ckpt",
        "modelled x ckpt, 30 s recoveries",
    ]
    rows, summary = [], {}
    groups = [("0%", runs["reference"])] + [(rate, rs) for rate, rs in runs["runs"].items()]
    for rate, rate_runs in groups:
        by_strategy: dict[str, list[dict]] = {}
        for run in rate_runs:
            by_strategy.setdefault(run["strategy"], []).append(run)
        ckpt = {r["seed"]: r for r in by_strategy.get("checkpoint", [])}
        for strategy, group in by_strategy.items():
            ok = [r for r in group if r["reached"]]
            ref = [ckpt.get(r["seed"]) for r in group]
            wall = speedups(
                [c["train_wall_s"] if c and c["reached"] else None for c in ref],
                [r["train_wall_s"] if r["reached"] else None for r in group],
            )
            model = speedups([c["modelled_h"] if c else None for c in ref], [r["modelled_h"] for r in group])
            fixed = speedups(
                [c["modelled_h_paper_recovery"] if c else None for c in ref],
                [r["modelled_h_paper_recovery"] for r in group],
            )
            row = {
                "reached": f"{len(ok)}/{len(group)}",
                "seeds": [r["seed"] for r in group],
                "steps_to_target": _mean([r["steps_to_target"] for r in ok]),
                "lost_steps": _mean([r["executed_steps"] - r["steps_to_target"] for r in ok]),
                "recoveries": _mean([r["recoveries"] for r in group]),
                "timeouts": sum(f.get("reason") == "timeout" for r in group for f in r["failures"]),
                "train_wall_s": _mean([r["train_wall_s"] for r in ok]),
                "measured_speedup": seed_interval(wall).__dict__,
                "modelled_h": _mean([r["modelled_h"] for r in ok]),
                "modelled_speedup": seed_interval(model).__dict__,
                "modelled_speedup_paper_recovery": seed_interval(fixed).__dict__,
            }
            summary.setdefault(rate, {})[strategy] = row
            rows.append(
                [
                    rate,
                    strategy,
                    row["reached"],
                    _fmt(row["steps_to_target"], ".0f"),
                    _fmt(row["lost_steps"], ".0f"),
                    _fmt(row["recoveries"], ".1f"),
                    _fmt(row["train_wall_s"], ".1f"),
                    format_interval(seed_interval(wall)) if ckpt else "-",
                    _fmt(row["modelled_h"], ".2f"),
                    format_interval(seed_interval(model)) if ckpt else "-",
                    format_interval(seed_interval(fixed)) if ckpt else "-",
                ]
            )
    return header, rows, summary


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), "-" * (sum(widths) + 2 * len(widths)), *map(line, rows)])


def report_tables(per_seed: dict, runs: dict, medians: dict) -> dict:
    """The cost summary and Table 2 (measured and modelled speed-ups with intervals), as data and as text."""
    cost_header, cost_rows, cost_summary = _cost_rows(per_seed, medians)
    header, rows, table = _table_rows(runs, per_seed)
    return {
        "costs": cost_summary,
        "table": table,
        "costs_text": _text(cost_header, cost_rows),
        "table_text": _text(header, rows),
        "costs_markdown": markdown_table(cost_header, cost_rows),
        "table_markdown": markdown_table(header, rows),
    }


_SPEEDUP_WORDS = {
    "win": "faster than checkpointing (interval above 1)",
    "loss": "slower than checkpointing (interval below 1)",
    "tie": "not distinguishable from checkpointing (interval includes 1)",
}


def _speedup_words(interval: dict) -> str:
    """A speed-up over checkpointing in words, from its paired verdict."""
    verdict = speedup_verdict(PairedDifference(**interval))
    return (
        "no interval (fewer than 2 seeds reached the target)" if verdict is None else _SPEEDUP_WORDS[verdict]
    )


def generated_notes(out: dict) -> list[str]:
    """Notes read off the measured values: per-step costs, recoveries, speed-ups against the paper's."""
    notes = []
    for strategy, row in out["costs"].items():
        rel = PairedDifference(**row["step_vs_checkpoint"])
        if strategy != "checkpoint" and rel.num_seeds:
            what = (
                " (no checkpoint saves: the gap to 1 shows the machine's noise floor too)"
                if strategy == "none"
                else ""
            )
            notes.append(
                f"Per step without failures, {strategy} costs {format_interval(rel, '.3f')} x checkpointing's "
                f"step over {rel.num_seeds} paired rounds{what}."
            )
    for strategy, row in out["costs"].items():
        for kind, rec in row["recovery_in_checkpoint_steps"].items():
            notes.append(
                f"A {kind} recovery under {strategy} costs {format_interval(PairedDifference(**rec), '.1f')} "
                f"checkpointing steps of wall time here, so {rec['mean'] * PAPER_BASE_ITER_S:.0f} s modelled "
                "(the paper charges 30 s per recovery)."
            )
    timeouts = {
        f"{rate} {strategy}": row["timeouts"]
        for rate, rows in out["table"].items()
        for strategy, row in rows.items()
        if row["timeouts"]
    }
    if timeouts:
        notes.append(
            f"Stages killed for not answering within the step timeout (the machine's load, not the failure "
            f"model) add recoveries to these runs: {timeouts}."
        )
    failed = [
        f"{rate} {r['strategy']} seed {r['seed']}"
        for rate, rs in out["runs"]["runs"].items()
        for r in rs
        if r["error"]
    ]
    if failed:
        notes.append(f"Runs that ended in an error (not reached): {failed}.")
    present = {(rate, r["strategy"]) for rate, rs in out["runs"]["runs"].items() for r in rs}
    strategies = sorted({s for _, s in present} | set(out["costs"]) - {"none"})
    rates = out["runs"].get("rates", list(PAPER_SPEEDUP_CHECKFREE_PLUS))  # the rates the runs were asked for
    missing = [f"{rate} {s}" for rate in rates for s in strategies if (rate, s) not in present]
    if missing:
        notes.append(f"Not run (the measurement was stopped before them): {missing}.")
    for rate, rows in out["table"].items():
        plus = rows.get("checkfree+")
        if plus is None or rate not in PAPER_SPEEDUP_CHECKFREE_PLUS:
            continue
        m, w = plus["modelled_speedup"], plus["measured_speedup"]
        fixed = PairedDifference(**plus["modelled_speedup_paper_recovery"])
        notes.append(
            f"{rate}: CheckFree+ modelled {format_interval(PairedDifference(**m))} x checkpointing "
            f"({_speedup_words(m)}), {format_interval(fixed)} with the paper's 30 s recoveries; measured wall clock from step 1 {format_interval(PairedDifference(**w))} "
            f"({_speedup_words(w)}); paper {PAPER_SPEEDUP_CHECKFREE_PLUS[rate]:.2f}x."
        )
        if "redundant" in rows and "checkfree" in rows:
            red, cf = rows["redundant"]["modelled_speedup"], rows["checkfree"]["modelled_speedup"]
            notes.append(
                f"{rate}: modelled speed-up over checkpointing: CheckFree {format_interval(PairedDifference(**cf))}"
                f", redundant {format_interval(PairedDifference(**red))} (paper: CheckFree >= 12% faster than "
                "redundant at 5-10%, redundant faster at 16%)."
            )
    return notes + drift_notes(out["cost_measurement"]) + hybrid_notes(out["runs"])


def drift_notes(costs: dict) -> list[str]:
    """How far one strategy's per-step time moved between its cost rounds: the floor under any per-step gap
    these rounds can resolve (the rounds run one after another, so the machine's drift lands between them).
    With interleaved blocks, how far the per-round ratio to checkpointing moved instead."""
    if costs.get("interleaved"):
        return interleaved_notes(costs["interleaved"])
    per_seed = costs_by_seed(costs)
    spans = {}
    for strategy in sorted({s for rounds in per_seed.values() for s in rounds}):
        steps = [rounds[strategy].step_s * 1000 for rounds in per_seed.values() if strategy in rounds]
        if len(steps) >= 2:
            spans[strategy] = f"{min(steps):.0f}-{max(steps):.0f} ms"
    if not spans:
        return []
    note = (
        f"Per-step time of the same strategy across its cost rounds: {spans}. A per-step gap smaller than that "
        "spread between strategies cannot be resolved by these rounds; blocks of steps interleaved across "
        "strategies in one round (as benchmarks/pipeline.py measures throughput) would resolve it."
    )
    return [note]


def interleaved_notes(interleaved: dict) -> list[str]:
    """Where the per-step costs came from, and each strategy's block-by-block ratio to checkpointing (paired by
    round, pooled over seeds) with its interval and spread."""
    seeds, rounds = len(interleaved["seeds"]), interleaved["rounds"]
    notes = [
        (
            f"Per-step costs come from blocks of {interleaved['block_steps']} steps interleaved across strategies "
            f"({rounds} rounds per seed, {seeds} seeds, every strategy's pipeline alive at once; each block of "
            "checkpointing holds one save), so the machine's drift lands on every strategy alike. Recovery costs "
            "come from the sequential cost rounds, each kept as a number of its own run's steps."
        )
    ]
    strategies = [s for s in next(iter(interleaved["seeds"].values()))["block_step_s"] if s != "checkpoint"]
    parts = []
    for strategy in strategies:
        ratios = round_ratios(interleaved, strategy)
        if len(ratios) >= 2:
            parts.append(
                f"{strategy} {format_interval(seed_interval(ratios), '.3f')} (blocks {min(ratios):.2f}-"
                f"{max(ratios):.2f}, n={len(ratios)})"
            )
    if parts:
        notes.append(
            "Block-by-block ratio of per-step time to checkpointing's block of the same round: "
            + "; ".join(parts)
            + "."
        )
    rivals = []
    for rival in HYBRID_GOALS:
        ratios = round_ratios(interleaved, rival, reference="hybrid")
        if len(ratios) >= 2:
            rivals.append(f"{rival} {format_interval(seed_interval(ratios), '.3f')}")
    if rivals:
        notes.append(
            "Per-step time of hybrid's rivals over hybrid's, block by block: "
            + "; ".join(rivals)
            + " (hybrid saves at its own Young/Daly interval, the rivals every "
            f"{interleaved['checkpoint_every']} steps as their fallback)."
        )
    return notes


_HYBRID_WORDS = {"win": "hybrid faster", "loss": "hybrid slower", "tie": "not distinguishable"}
HYBRID_GOALS = {
    "redundant": "16%",
    "checkfree+": "5%",
}  # the spot-cluster goal: beat redundant at 16%, match CF+ at 5%


def hybrid_notes(runs: dict) -> list[str]:
    """Hybrid against redundant computation and CheckFree+ at each rate: the per-seed ratio of modelled hours
    (other / hybrid, so > 1 means hybrid is faster), paired by seed, with its 95% interval and verdict."""
    notes = []
    for rate, rate_runs in runs["runs"].items():
        by = {(r["strategy"], r["seed"]): r for r in rate_runs}
        hybrid_seeds = sorted(seed for strategy, seed in by if strategy == "hybrid")
        for other, goal_rate in HYBRID_GOALS.items():
            seeds = [seed for seed in hybrid_seeds if (other, seed) in by]
            ratios = speedups(
                [by[(other, s)].get("modelled_h") for s in seeds],
                [by[("hybrid", s)].get("modelled_h") for s in seeds],
            )
            if not ratios:
                continue
            interval = seed_interval(ratios)
            verdict = _HYBRID_WORDS.get(speedup_verdict(interval), "no interval")
            goal = " (the goal's rate)" if rate == goal_rate else ""
            notes.append(
                f"{rate}{goal}: {other}'s modelled hours over hybrid's, paired by seed: "
                f"{format_interval(interval)} ({verdict}; > 1 means hybrid reaches the target sooner)."
            )
    return notes


def _loads(values: list[float] | None) -> str:
    return "-" if not values else "/".join(f"{v:.1f}" for v in values)


def notes_sections(out: dict) -> tuple[str, list[tuple[str, str | list[str]]]]:
    """paper_table2.md's title and sections: the failure model, the cost model, both tables, the generated notes
    and the machine."""
    fm, costs, runs = out["failure_model"], out["cost_measurement"], out["runs"]
    header = (
        f"Failure model: per stage per step p = {fm['probability_per_step']} (the paper's "
        f"{fm['paper_probability_per_step']} for {', '.join(fm['paper_hourly_rate_per_stage'])} per hour at "
        f"{fm['paper_step_time_assumed_s']} s per iteration, x{fm['failure_scale']:g}); the same per-step p for "
        f"every strategy. Checkpoint every {fm['checkpoint_every']} steps (paper {fm['paper_checkpoint_every']},"
        f" /{fm['failure_scale']:g}). Seed streams: {fm['seed_streams']}. Target {runs['target_val_loss']}, "
        f"checked every {runs['eval_every']} steps; seeds {runs['seeds']}."
    )
    parts = "; ".join(
        f"seeds {p['seeds']} at niceness {p['niceness']}, load average {_loads(p['load_before'])} "
        f"before and {_loads(p['load_after'])} after"
        for p in runs.get("parts", [])
    )
    cost_machine = costs.get("machine", {})
    machine = (
        f"Costs measured at niceness {cost_machine.get('niceness')}, load average (1, 5, 15 min) "
        f"{_loads(costs['load_before'])} before and {_loads(costs.get('load_after'))} after, on "
        f"{cost_machine.get('cores')} cores. Runs (not a timing measurement; their wall clock is): {parts}."
    )
    if costs.get("interleaved"):
        inter = costs["interleaved"]
        machine = (
            f"Per-step costs (interleaved blocks) measured at load average {_loads(inter['load_before'])} "
            f"before and {_loads(inter.get('load_after'))} after. Recovery costs: " + machine
        )
    model = (
        f"{out['model']['formula']}. Per-step cost c_s: mean wall time between commits over a failure-free "
        "window (copies, replication and save stalls included); recovery: extra wall time around a scheduled "
        "kill (detection + rebuild + retried step), in checkpointing steps."
    )
    return (
        "CheckFree Table 2 with a measured cost model",
        [
            ("Setup", header),
            ("Cost model", model),
            ("Measured costs (paired rounds, mean [95% interval])", out["costs_markdown"]),
            (
                "Time to target (speed-ups over checkpointing, mean [95% interval] over seeds)",
                out["table_markdown"],
            ),
            ("Notes generated from these measurements", generated_notes(out)),
            ("Machine", machine),
        ],
    )
