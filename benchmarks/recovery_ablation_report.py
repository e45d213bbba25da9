"""Statistics, table, figure and generated notes of the recovery ablation (benchmarks/recovery_ablation.py).

Every number and every sentence of the notes comes from the measurements passed in: each interval and verdict is
the harness's paired table (`harness.paired_table`, `rayops.paired`) over seeds, never written in advance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from harness import paired_table

PAPER_ORDER = ["weighted", "average", "copy", "random"]


def _groups(scale_result: dict) -> dict[tuple, list[tuple[dict, list[float], list[int]]]]:
    """(lr_scale, stage, name) -> per seed, in seed order: (run, twin losses, offsets)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for seed in scale_result["seeds"]:
        for run in seed["runs"]:
            groups[(run["lr_scale"], run["stage"], run["name"])][seed["seed"]] = (
                run,
                seed["twin"],
                seed["offsets"],
            )
    return {key: [by_seed[s] for s in sorted(by_seed)] for key, by_seed in groups.items()}


def _key(lr_scale: float, stage: int, name: str) -> str:
    return f"lr{lr_scale}/stage{stage}/{name}"


def case_rows(scale_result: dict) -> list[dict]:
    """One row per (seed, lr_scale, stage, rule) with (a) the loss right after the rebuild, (b) the steps until it
    is back within 1% (censored at the horizon) and (c) the loss at the end, and the no-failure twin of each
    (lr_scale, stage) as config '.../twin' ((b) 0): the rows the paired tables compare."""
    after, rows = scale_result["after"], []
    for seed in scale_result["seeds"]:
        twin = seed["twin"]
        for run in seed["runs"]:
            back = run["recovered_after"]
            values = {
                "a": run["losses"][0],
                "b": float(after if back is None else back),
                "c": run["losses"][-1],
            }
            rows.append(
                {"config": _key(run["lr_scale"], run["stage"], run["name"]), "seed": seed["seed"], **values}
            )
            twin_key = _key(run["lr_scale"], run["stage"], "twin")
            rows.append({"config": twin_key, "seed": seed["seed"], "a": twin[0], "b": 0.0, "c": twin[-1]})
    return rows


def paired(rows: list[dict], metric: str, config: str, baseline: str) -> dict | None:
    """`config`'s `metric` minus `baseline`'s over their shared seeds (the harness's paired table, lower better):
    {mean, low, high, n, verdict}; None when they share no seed."""
    seeds = [{r["seed"] for r in rows if r["config"] == name} for name in (config, baseline)]
    if not seeds[0] & seeds[1]:
        return None
    (entry,) = paired_table(rows, metric, baseline=baseline, better="lower", configs=[config])["rows"]
    return {
        "mean": entry["difference"],
        "low": entry["low"],
        "high": entry["high"],
        "n": entry["seeds"],
        "verdict": entry["verdict"],
    }


def summarise(scale_result: dict) -> list[dict]:
    """One row per (lr_scale, stage, rule): (a) loss right after the rebuild, (b) steps back within 1%, (c) the
    loss at the end, as paired differences against the twin; and (a), (c) of weighted minus this rule."""
    groups = _groups(scale_result)
    cases = case_rows(scale_result)
    rows = []
    for (lr_scale, stage, name), items in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        a = [run["losses"][0] for run, _, _ in items]
        twin_a = [t[0] for _, t, _ in items]
        steps = [run["recovered_after"] for run, _, _ in items]
        key, twin = _key(lr_scale, stage, name), _key(lr_scale, stage, "twin")
        row = {
            "strategy": scale_result["strategy"],
            "lr_scale": lr_scale,
            "stage": stage,
            "rule": name,
            "a_excess": paired(cases, "a", key, twin),
            "a_relative": sum(x / y - 1 for x, y in zip(a, twin_a)) / len(a),
            "b_steps": paired(cases, "b", key, twin),
            "b_censored": sum(s is None for s in steps),
            "c_excess": paired(cases, "c", key, twin),
            "a_values": a,
            "c_values": [run["losses"][-1] for run, _, _ in items],
            "b_values": steps,
        }
        if name != "weighted" and (lr_scale, stage, "weighted") in groups:
            for tag in ("a", "c"):
                d = paired(cases, tag, _key(lr_scale, stage, "weighted"), key)
                if d is not None:
                    row[f"weighted_minus_{tag}"] = d
        rows.append(row)
    return rows


def clip_stats(scale_result: dict) -> dict:
    """Weighted rebuilds: the previous neighbour's mean weight, and how many had equal weighing norms (both
    neighbours at the clip: the weighted rule is then the plain average)."""
    weights, equal = [], 0
    for seed in scale_result["seeds"]:
        for run in seed["runs"]:
            if run["rule"] == "weighted" and run["recipe"].get("weights"):
                weights.append(run["recipe"]["weights"][0])
                equal += abs(run["recipe"]["weights"][0] - 0.5) < 1e-6
    return {
        "rebuilds": len(weights),
        "equal_weights": equal,
        "mean_previous_weight": sum(weights) / len(weights) if weights else None,
    }


def _fmt(d: dict, digits: int = 3) -> str:
    if d["n"] < 2 or math.isnan(d["low"]):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def table_text(scale_result: dict, rows: list[dict]) -> str:
    """The printed table of one scale and strategy."""
    model = scale_result["model"]
    head = (
        f"{scale_result['scale']} (d={model['d_model']}, {model['n_layers']} layers, "
        f"{scale_result['parameters'] / 1e6:.2f}M parameters), {scale_result['strategy']}, "
        f"{len({s['seed'] for s in scale_result['seeds']})} seeds, measured {scale_result['after']} steps after the rebuild"
    )
    cols = (
        f"{'lr':>4} {'stage':>5} {'rule':<18} {'(a) after rebuild - twin':>28} {'(b) steps to 1%':>22} "
        f"{'(c) end - twin':>28}"
    )
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        censored = f" ({r['b_censored']} >{scale_result['after']})" if r["b_censored"] else ""
        lines.append(
            f"{r['lr_scale']:>4} {r['stage']:>5} {r['rule']:<18} {_fmt(r['a_excess']):>28} "
            f"{_fmt(r['b_steps'], 1) + censored:>22} {_fmt(r['c_excess']):>28}"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Mean excess validation loss over the twin against steps after the rebuild, per scale and stage (lr x1.1)."""
    panels = [
        (res, stage)
        for res in results
        for stage in sorted({r["stage"] for s in res["seeds"] for r in s["runs"]})
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (res, stage) in zip(axes[0], panels):
        offsets = res["seeds"][0]["offsets"]
        for (lr_scale, s, name), items in _groups(res).items():
            if s != stage or lr_scale != 1.1:
                continue
            excess = [
                sum(r["losses"][i] - t[i] for r, t, _ in items) / len(items) for i in range(len(offsets))
            ]
            ax.plot([o + 1 for o in offsets], excess, lw=1.2, label=name)
        ax.set_xscale("log")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{res['scale']} {res['strategy']} stage {stage}", fontsize=9)
        ax.set_xlabel("steps after the rebuild + 1")
        ax.set_ylabel("val loss - no-failure twin (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _verdict(d: dict, better: str, worse: str, tie: str) -> str:
    """The paired verdict of a loss difference `d` (`paired`: lower is better), in the given words."""
    if d["n"] < 2 or math.isnan(d["low"]):
        return f"{tie} (one seed: no interval)"
    return {"win": better, "loss": worse, "tie": tie}[d["verdict"]]


def lr_lines(scale_result: dict) -> list[str]:
    """Per stage: each rule's (c) with the rebuilt stage at lr x1.1 minus at x1.0, paired by seed."""
    groups = _groups(scale_result)
    cases = case_rows(scale_result)
    lines = []
    for stage in sorted({s for _, s, _ in groups}):
        parts = []
        for name in ("weighted", "average", "copy", "random", "identity", "exact"):
            d = paired(cases, "c", _key(1.1, stage, name), _key(1.0, stage, name))
            if d is not None:
                parts.append(f"{name} {_fmt(d)}")
        if parts:
            lines.append(
                f"- Stage {stage}, (c) at lr x1.1 minus at x1.0 (negative: x1.1 ends lower): "
                + "; ".join(parts)
                + "."
            )
    return lines


def notes(results: list[dict], summaries: list[list[dict]], load: list[float]) -> list[str]:
    """Markdown lines stating what the measurements show (each sentence filled from the values)."""
    out = []
    for res, rows in zip(results, summaries):
        cases = case_rows(res)
        m = res["model"]
        plateau = res["plateau"]
        tail = ""
        if len(plateau["val_losses"]) >= 3:
            tail = (
                f"; its validation loss moved {plateau['val_losses'][-1] - plateau['val_losses'][-3]:+.4f} over "
                f"the last {plateau['val_steps'][-1] - plateau['val_steps'][-3]} steps"
            )
        out.append(
            f"### {res['scale']}, {res['strategy']}: d={m['d_model']}, {m['n_layers']} layers "
            f"({m['n_layers'] // res['pipeline']['num_stages']} per stage), "
            f"{res['parameters'] / 1e6:.2f}M parameters"
        )
        out.append(
            f"- Trained model: step {res['plateau_steps']} of a {res.get('run_steps', res['plateau_steps'])}-step "
            f"run at a constant learning rate, validation loss "
            f"{plateau['val_losses'][-1]:.4f}{tail}. Seeds {sorted({s['seed'] for s in res['seeds']})}, failure "
            f"steps {sorted({s['fail_step'] for s in res['seeds']})}, measured for {res['after']} steps."
        )
        by = {(r["lr_scale"], r["stage"], r["rule"]): r for r in rows}
        for lr_scale, stage in sorted(
            {(r["lr_scale"], r["stage"]) for r in rows}, key=lambda k: (-k[0], k[1])
        ):
            here = {rule: r for (lr, s, rule), r in by.items() if (lr, s) == (lr_scale, stage)}
            ranked = sorted(here, key=lambda rule: here[rule]["a_excess"]["mean"])
            line = (
                f"- lr x{lr_scale}, stage {stage}: by (a), best to worst: "
                + ", ".join(f"{rule} {here[rule]['a_excess']['mean']:+.3f}" for rule in ranked)
                + "."
            )
            order = [rule for rule in ranked if rule in PAPER_ORDER]
            if len(order) > 1:
                line += f" The paper's order {' < '.join(PAPER_ORDER)} " + (
                    "holds in the means."
                    if order == PAPER_ORDER
                    else f"does not hold: here {' < '.join(order)}."
                )
            rebuilt = [here[rule]["a_excess"]["mean"] for rule in here if rule != "exact"]
            if len(rebuilt) > 1:
                line += (
                    f" Spread between the rebuilding rules {max(rebuilt) - min(rebuilt):.3f} nats, "
                    f"{(max(rebuilt) - min(rebuilt)) / min(rebuilt):.0%} of the smallest damage "
                    f"({min(rebuilt):.3f})."
                )
            if "random" in here and "identity" in here:
                d = paired(cases, "a", _key(lr_scale, stage, "random"), _key(lr_scale, stage, "identity"))
                line += f" Random - identity on (a): {_fmt(d, 4)}."
            for other in ("random", "identity", "average", "copy", "weighted/pre_clip", "weighted/blocks"):
                if other in here and "weighted_minus_a" in here[other]:
                    d = here[other]["weighted_minus_a"]
                    line += (
                        f" Weighted - {other} on (a): {_fmt(d)}, "
                        + _verdict(d, "weighted better", "weighted worse", "not distinguishable")
                        + "."
                    )
            out.append(line)
        out.extend(lr_lines(res))
        clip = clip_stats(res)
        if clip["rebuilds"]:
            out.append(
                f"- Weighted rebuilds: {clip['equal_weights']} of {clip['rebuilds']} had equal weighing norms "
                f"(then weighted = average); mean weight of the previous neighbour "
                f"{clip['mean_previous_weight']:.3f}."
            )
    out.append(
        f"1-minute load average when the measurements were saved: {min(load):.0f} to {max(load):.0f} "
        f"(2 shared cores; timings are not comparable, losses are)."
    )
    return out
