"""Tables, figure and generated notes of the width study (benchmarks/recovery_width.py).

Every number and verdict is read off the measurements passed in (95% paired intervals over seeds, the harness's
paired table as in the ablation's report), never written in advance.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import itertools

import harness
import matplotlib.pyplot as plt
from _common import RESULTS
from recovery_ablation_report import case_rows, paired, summarise

RULES = ["weighted", "average", "copy", "random", "identity"]
PAPER_ORDER = ["weighted", "average", "copy", "random"]
PAPER_WIDTHS = {"124M": 512, "500M": 1024, "1.5B": 2048}


DESCRIBE = (
    "Each width (4 layers, one block per stage, 4 stages, byte-level data, constant lr 3e-3) is trained for "
    "the same number of tokens per parameter; then, per seed, training continues on the seed's data, a middle "
    "stage is lost after the seed's delay, and each rule rebuilds it from copies of the same state (lr x1.1, "
    "fresh AdamW). (a) validation loss right after the rebuild minus the no-failure twin's; (b) steps until "
    "it is back, and stays, within 1% of the twin's (censored at the horizon); (c) at the end. Mean over "
    "seeds [95% paired interval]. 'random' is the model's own initialisation (normal std 0.02 weights, unit "
    "RMSNorm gains; the paper does not state its initialiser); 'identity' makes the stage an exact skip."
)


def merge(rows: list[dict]) -> list[dict]:
    """One result per (width, tokens per parameter), its seeds in order, sorted by k then width."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["d_model"], row["tokens_per_param"])].append(row)
    out = []
    for (d, k), parts in groups.items():
        parts.sort(key=lambda p: p["seed"])
        first = parts[0]
        out.append(
            {
                "scale": f"d={d}",
                "strategy": "checkfree",
                **{
                    key: first[key] for key in ("d_model", "tokens_per_param", "model", "parameters", "after")
                },
                "plateau_steps": first["plateau_steps"],
                "plateau": first["plateau"],
                "residual_norms": first["residual_norms"],
                "seeds": [
                    {key: p[key] for key in ("seed", "fail_step", "offsets", "twin", "runs")} for p in parts
                ],
                "load_average": [p["load_average_1min"] for p in parts],
            }
        )
    return sorted(out, key=lambda r: (r["tokens_per_param"], r["d_model"]))


def _iv(d: dict, digits: int = 3) -> str:
    if d["n"] < 2 or math.isnan(d["low"]):
        return f"{d['mean']:+.{digits}f} (n={d['n']})"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _verdict(d: dict, better: str = "weighted") -> str:
    """The paired verdict of a loss difference (`recovery_ablation_report.paired`) in words."""
    if d["n"] < 2 or math.isnan(d["low"]):
        return "no interval"
    return {"win": f"{better} better", "loss": f"{better} worse", "tie": "not distinguishable"}[d["verdict"]]


def learning_point(res: dict) -> dict:
    """Where training stopped: validation loss and its relative fall per 100 steps, over the last 100 or more
    steps (from the latest validation at least 100 steps before the end)."""
    steps, losses = res["plateau"]["val_steps"], res["plateau"]["val_losses"]
    earlier = [i for i, s in enumerate(steps) if s <= steps[-1] - 100]
    fall = None
    if earlier:
        i = earlier[-1]
        fall = (losses[i] - losses[-1]) / losses[i] / ((steps[-1] - steps[i]) / 100)
    return {"step": steps[-1], "val_loss": losses[-1], "fall_per_100_steps": fall}


def table(res: dict, rows: list[dict]) -> str:
    """One (width, k)'s table."""
    lp = learning_point(res)
    fall = "-" if lp["fall_per_100_steps"] is None else f"{lp['fall_per_100_steps']:.2%}"
    head = (
        f"d={res['d_model']}, {res['model']['n_layers']} layers, {res['parameters'] / 1e6:.2f}M parameters, "
        f"{res['tokens_per_param']:g} tokens/parameter (step {lp['step']}, val loss {lp['val_loss']:.3f}, "
        f"falling {fall} per 100 steps), {len(res['seeds'])} seeds, {res['after']} steps after the rebuild"
    )
    lines = [
        head,
        (
            f"{'stage':>5} {'rule':<9} {'(a) after rebuild - twin':>26} {'(b) steps to 1%':>24} "
            f"{'(c) end - twin':>26} {'weighted - rule on (a)':>28}"
        ),
    ]
    for r in rows:
        b = f"{r['b_steps']['mean']:.0f}" + (
            f" ({r['b_censored']} >{res['after']})" if r["b_censored"] else ""
        )
        w = _iv(r["weighted_minus_a"]) if "weighted_minus_a" in r else ""
        lines.append(
            f"{r['stage']:>5} {r['rule']:<9} {_iv(r['a_excess']):>26} {b:>24} {_iv(r['c_excess']):>26} {w:>28}"
        )
    return "\n".join(lines)


def _row(rows: list[dict], stage: int, rule: str) -> dict | None:
    return next((r for r in rows if r["stage"] == stage and r["rule"] == rule), None)


def _random_minus_identity(res: dict, stage: int) -> dict:
    return paired(case_rows(res), "a", f"lr1.1/stage{stage}/random", f"lr1.1/stage{stage}/identity")


def notes(results: list[dict], summaries: list[list[dict]]) -> list[str]:
    """Generated notes: per (width, k) the order and the paired verdicts, then the trend and the norms."""
    out = []
    for res, rows in zip(results, summaries):
        out.append(f"### d={res['d_model']}, {res['tokens_per_param']:g} tokens/parameter")
        for stage in sorted({r["stage"] for r in rows}):
            by = {r["rule"]: r for r in rows if r["stage"] == stage}
            order = sorted(by, key=lambda n: by[n]["a_excess"]["mean"])
            paper = [n for n in order if n in PAPER_ORDER] == PAPER_ORDER
            parts = [
                f"- stage {stage}: by (a), best to worst: "
                + ", ".join(f"{n} {by[n]['a_excess']['mean']:+.3f}" for n in order)
                + (
                    "; the paper's order weighted < average < copy < random holds."
                    if paper
                    else "; the paper's order weighted < average < copy < random does not hold."
                )
            ]
            for other in ("random", "average", "copy", "identity"):
                if other in by and "weighted_minus_a" in by[other]:
                    d = by[other]["weighted_minus_a"]
                    parts.append(f"weighted - {other} on (a): {_iv(d)}, {_verdict(d)}.")
            rmi = _random_minus_identity(res, stage)
            parts.append(f"Random - identity on (a): {_iv(rmi, 4)}.")
            censored = sum(by[n]["b_censored"] for n in by)
            total = sum(len(by[n]["b_values"]) for n in by)
            parts.append(
                f"{censored} of {total} rebuilds not back within 1% of the twin after {res['after']} steps."
            )
            out.append(" ".join(parts))
        for n in res["residual_norms"]:
            out.append(
                f"- residual stream entering stage {n['stage']}: RMS {n['stream_rms']:.3f}; the trained stage adds "
                f"{n['trained_delta_rms']:.3f} ({n['trained_over_stream']:.2f}x), a fresh std-0.02 stage "
                f"{n['fresh_delta_rms']:.4f} ({n['fresh_over_stream']:.4f}x)."
            )
    out.append("")
    out.append("### Trend with width")
    points = [
        (
            f"{r['d_model']} at {r['tokens_per_param']:g}",
            learning_point(r),
            r["residual_norms"][0]["stream_rms"],
        )
        for r in results
    ]
    out.append(
        "- Where each width stopped (same tokens per parameter, constant lr): "
        + "; ".join(
            f"d={d}: step {lp['step']}, val loss {lp['val_loss']:.3f}, falling "
            + ("-" if lp["fall_per_100_steps"] is None else f"{lp['fall_per_100_steps']:.1%}")
            + f" per 100 steps, stream RMS {rms:.2f}"
            for d, lp, rms in points
        )
        + ". Equal tokens per parameter is not the same point of the learning curve at these lengths: the "
        "comparison across widths carries that difference too."
    )
    for k in sorted({r["tokens_per_param"] for r in results}):
        for rule in ("random", "average", "copy", "identity"):
            for stage in sorted({row["stage"] for rows in summaries for row in rows}):
                pts = []
                for res, rows in zip(results, summaries):
                    r = _row(rows, stage, rule)
                    if res["tokens_per_param"] == k and r is not None and "weighted_minus_a" in r:
                        pts.append((res["parameters"], res["d_model"], r["weighted_minus_a"]))
                if len(pts) < 2:
                    continue
                text = "; ".join(f"d={d} ({p / 1e6:.2f}M): {_iv(g)} ({_verdict(g)})" for p, d, g in pts)
                gaps = [g["mean"] for _, _, g in pts]
                trend = (
                    f"falls (weighted gains on {rule}) with every width step"
                    if all(b < a for a, b in itertools.pairwise(gaps))
                    else f"rises (weighted loses ground to {rule}) with every width step"
                    if all(b > a for a, b in itertools.pairwise(gaps))
                    else "is not monotonic in width"
                )
                out.append(f"- k={k:g}, stage {stage}: weighted - {rule} on (a): {text}. The gap {trend}.")
    for d in sorted({r["d_model"] for r in results}):
        tiers = [(res, rows) for res, rows in zip(results, summaries) if res["d_model"] == d]
        if len(tiers) < 2:
            continue
        for stage in sorted({row["stage"] for _, rows in tiers for row in rows}):
            parts = []
            for res, rows in tiers:
                r = _row(rows, stage, "random")
                if r is not None and "weighted_minus_a" in r:
                    lp = learning_point(res)
                    parts.append(
                        f"{res['tokens_per_param']:g} tokens/parameter (val loss {lp['val_loss']:.3f}): "
                        f"{_iv(r['weighted_minus_a'])} ({_verdict(r['weighted_minus_a'])})"
                    )
            out.append(
                f"- Training length at d={d}, stage {stage}: weighted - random on (a) at "
                + "; ".join(parts)
                + "."
            )
    return out


def fresh_notes(fresh: list[dict], results: list[dict]) -> list[str]:
    """What a fresh std-0.02 stage adds (unit-RMS input) by width and blocks per stage, against the trained
    streams' RMS measured here."""
    streams = [n["stream_rms"] for r in results for n in r["residual_norms"]]
    if not fresh or not streams:
        return []
    lo, hi = min(streams), max(streams)
    d = [f["d_model"] for f in fresh if f["blocks"] == 1]
    v = [f["fresh_delta_rms"] for f in fresh if f["blocks"] == 1]
    slope = float(np.polyfit(np.log(d), np.log(v), 1)[0]) if len(d) > 1 else float("nan")
    text = ", ".join(f"d={f['d_model']} x{f['blocks']} {f['fresh_delta_rms']:.3f}" for f in fresh)
    paper = [f for f in fresh if (f["d_model"], f["blocks"]) in ((512, 3), (1024, 4), (2048, 4))]
    ratios = ", ".join(
        f"d={f['d_model']} x{f['blocks']}: {f['fresh_delta_rms'] / hi:.2f}-{f['fresh_delta_rms'] / lo:.2f}"
        for f in paper
    )
    return [
        f"- A fresh stage (std-0.02 initialisation, head dim 64) adds RMS {text} to a unit-RMS stream "
        f"(width x blocks per stage); with one block it grows as d^{slope:.2f}. The trained streams measured "
        f"here have RMS {lo:.2f}-{hi:.2f}. At the paper's stage shapes (124M: d=512 x3, 500M: d=1024 x4, 1.5B: "
        f"d=2048 x4) a fresh stage over a stream of that RMS adds {ratios} of it, against "
        + ", ".join(f"{n['fresh_over_stream']:.3f}" for r in results for n in r["residual_norms"])
        + " at the widths trained here (stream RMS at the paper's sizes not measured: an assumption).",
    ]


# seconds per training step of one process, one thread, measured at load average ~1 on this 2-core VM (d, 4 layers,
# 1024 tokens per step); wider models scale by parameters from the widest measured
UNLOADED_STEP_S = {64: 0.037, 128: 0.096, 256: 0.306}


def missing_notes(plan: list[tuple[int, float]], results: list[dict], measure_steps: int) -> list[str]:
    """For each plan entry without measurements: the steps it needs and the hours on one quiet core here."""
    from recovery_width import parameters, steps_for

    done = {(r["d_model"], r["tokens_per_param"]) for r in results}
    out = []
    for d, k in plan:
        if (d, k) in done:
            continue
        widest = max(w for w in UNLOADED_STEP_S if w <= max(d, 64))
        step_s = UNLOADED_STEP_S.get(d, UNLOADED_STEP_S[widest] * parameters(d) / parameters(widest))
        steps = steps_for(d, k)
        minutes = (steps + measure_steps) * step_s / 60
        out.append(
            f"- Not run: d={d} ({parameters(d) / 1e6:.2f}M parameters) at {k:g} tokens/parameter: {steps} training "
            f"steps plus about {measure_steps} for the measurement, {minutes:.0f} min of one quiet core here at "
            f"{step_s:.3f} s/step; at this machine's shared load (a niced process got 2-10% of a core) many times "
            "that; minutes on a GPU."
        )
    return out


def ablation_points() -> list[dict]:
    """Weighted - random on (a) from recovery_ablation.json's CheckFree scales (the same protocol and model
    family, trained longer; lr x1.1): context for the effect of training length at one width."""
    path = RESULTS / "recovery_ablation.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    out = []
    for summary, res in zip(data["summaries"], data["measurements"]):
        if summary["strategy"] != "checkfree":
            continue
        for row in summary["rows"]:
            if row["rule"] == "random" and row["lr_scale"] == 1.1 and "weighted_minus_a" in row:
                out.append(
                    {
                        "scale": summary["scale"],
                        "model": res["model"],
                        "parameters": res["parameters"],
                        "tokens_per_param": res["plateau_steps"] * 1024 / res["parameters"],
                        "stage": row["stage"],
                        "weighted_minus_random_a": row["weighted_minus_a"],
                    }
                )
    return out


def ablation_notes(points: list[dict]) -> list[str]:
    """The ablation's longer-trained points beside this study's."""
    return [
        f"- From the ablation (recovery_ablation.json), {p['scale']} (d={p['model']['d_model']}, "
        f"{p['model']['n_layers']} layers, {p['parameters'] / 1e6:.2f}M, {p['tokens_per_param']:.1f} tokens/parameter),"
        f" stage {p['stage']}: weighted - random on (a) {_iv(p['weighted_minus_random_a'])} "
        f"({_verdict(p['weighted_minus_random_a'])})."
        for p in points
    ]


def plot(results: list[dict], summaries: list[list[dict]], path: Path) -> None:
    """Weighted - random on (a) against parameters, one line per (k, stage), 95% intervals as error bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = defaultdict(list)
    for res, rows in zip(results, summaries):
        for r in rows:
            if r["rule"] == "random" and "weighted_minus_a" in r:
                lines[(res["tokens_per_param"], r["stage"])].append(
                    (res["parameters"], r["weighted_minus_a"])
                )
    for (k, stage), pts in sorted(lines.items()):
        pts.sort()
        x = [p for p, _ in pts]
        y = [g["mean"] for _, g in pts]
        err = [
            [g["mean"] - g["low"] if g["n"] > 1 else 0 for _, g in pts],
            [g["high"] - g["mean"] if g["n"] > 1 else 0 for _, g in pts],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{k:g} tokens/param, stage {stage}")
    for p in ablation_points():
        g = p["weighted_minus_random_a"]
        ax.errorbar(
            [p["parameters"]],
            [g["mean"]],
            yerr=[[g["mean"] - g["low"]], [g["high"] - g["mean"]]],
            marker="s",
            capsize=3,
            ls="none",
            color="grey",
            alpha=0.7,
        )
        ax.annotate(
            f"ablation {p['tokens_per_param']:.1f} tok/param, stage {p['stage']}",
            (p["parameters"], g["mean"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("weighted - random: loss right after rebuild (nats)")
    ax.set_title("CheckFree's weighted rebuild against a random stage, by model size\n(< 0: weighted better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    args,
    record: dict,
    rows: list[dict],
    sweep: harness.Sweep,
    fresh: list[dict] | None = None,
    plan: list[tuple[int, float]] = (),
    measure_steps: int = 0,
) -> None:
    """Write recovery_width.json, .png and .md from `rows` (the harness's `finish`) and `fresh`: what a fresh stage
    adds by width (`recovery_width.fresh_stage_rms`)."""
    if not rows:
        print("no measurements yet")
        return
    results = merge(rows)
    summaries = [summarise(r) for r in results]
    tables = [table(r, rows) for r, rows in zip(results, summaries)]
    print("\n\n".join(tables))
    generated = (
        notes(results, summaries)
        + fresh_notes(fresh or [], results)
        + ablation_notes(ablation_points())
        + missing_notes(list(plan), results, measure_steps)
    )
    loads = [x for r in results for x in r["load_average"]]
    sweep.extra.update(
        summaries=[
            {
                "d_model": r["d_model"],
                "tokens_per_param": r["tokens_per_param"],
                "parameters": r["parameters"],
                "learning_point": learning_point(r),
                "residual_norms": r["residual_norms"],
                "rows": rows,
            }
            for r, rows in zip(results, summaries)
        ],
        fresh_stage=fresh or [],
        tables=tables,
        notes=generated,
        measurements=[{k: v for k, v in r.items() if k != "seeds"} for r in results],
    )
    out = harness.results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, summaries, out / "recovery_width.png")
    shown = "\n".join(
        [
            *generated,
            "",
            (
                f"1-minute load average when each seed was saved: {min(loads):.0f} to {max(loads):.0f} (2 shared "
                "cores; timings are not comparable, losses are)."
            ),
        ]
    )
    harness.finish(
        sweep,
        args,
        record,
        rows,
        title="CheckFree's recovery rules against model width (generated by benchmarks/recovery_width.py)",
        sections=[
            (
                "Results",
                "\n".join(f"```\n{t}\n```\n" for t in tables)
                + "\n![weighted - random against parameters](recovery_width.png)",
            ),
            ("What the measurements show", shown),
        ],
    )
