"""Multi-fidelity LCSC search: best final FID against samples generated, with and without successive halving.

Same evaluation budget (candidates screened) for each configuration, same final sample count for every
reported model (`fid.holdout_num_samples`), held-out noise seeds unseen by the search. Configurations:
- flat 500:   every candidate scored once with 500 samples;
- SH 250→1000: candidates screened with 250 samples, the best 25% re-scored with 1000
  (`search.fidelity_schedule: [250, 1000]`, `keep_fraction: 0.25`).
Run from the repository root:

    .venv/bin/python benchmarks/search_fidelity.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_optimizers as common
from search_optimizers import BENCH_OUT, ROOT, mean_sd

CONFIGS = {
    "flat 500": {"num_samples": 500, "search": {}},
    "SH 250->1000 keep 0.25": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [250, 1000], "keep_fraction": 0.25},
    },
    "flat 1000": {"num_samples": 1000, "search": {}},
}
WHY_OWN_LOOP = (
    "Successive halving runs in the search's own driver loop (SearchRun.run_rungs), not as Tune's ASHA "
    "scheduler: ASHA stops iterative trials early at milestones of a training-like loop, but an LCSC "
    "candidate is one evaluation, and 'more fidelity' is a fresh re-evaluation of the same coefficients "
    "with more samples (not a continuation of the cheap one). The optimiser must be told the cheap score "
    "at once so its ask/tell loop keeps moving, and the rungs then re-score only the best fraction, "
    "keyed and resumable in the evaluation record."
)


def conclusion(table: list[dict]) -> str:
    """One sentence from the table: final held-out FID per search sample spent."""
    parts = [
        f"{t['config']}: {t['holdout_fid_mean']:.2f} held-out FID for {t['search_samples_mean']:,.0f} search "
        f"samples ({t['total_samples_mean']:,.0f} with final scores)"
        for t in table
    ]
    best = min(table, key=lambda t: t["holdout_fid_mean"])
    return "Measured: " + "; ".join(parts) + f". Lowest final FID: {best['config']}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="budget 12, 1 held-out seed, two configs")
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=["flat 500", "SH 250->1000 keep 0.25"])
    parser.add_argument("--final-samples", type=int, default=1000)
    parser.add_argument("--holdout-seeds", type=int, nargs="+", default=[1001, 1002])
    args = parser.parse_args()
    tag = "quick" if args.quick else "full"
    budget = 12 if args.quick else args.budget
    holdout = [1001] if args.quick else args.holdout_seeds
    final = args.final_samples
    common.ensure_trained()
    started = time.monotonic()
    rows = []
    with common.ray_context():
        machine = common.machine_info()
        for seed in args.seeds:
            for name in args.configs:
                config = CONFIGS[name]
                slug = name.replace(" ", "_").replace("->", "-").replace(".", "")
                out = str(BENCH_OUT / f"fidelity-{tag}-b{budget}" / f"{slug}-seed{seed}")
                spec = common.make_spec(
                    out,
                    seed=seed,
                    holdout_seeds=holdout,
                    holdout_num_samples=final,
                    num_samples=config["num_samples"],
                    budget=budget,
                    rescore_top_k=1,
                    optimizer="CMA",
                    bound=3.0,
                    sigma=0.15,
                    **config["search"],
                )
                row = common.run_cached_search(spec) | {"config": name}
                rows.append(row)
                print(
                    f"{name:24s} seed {seed}: winner held-out {row['winner_holdout_fid']:.2f} at {final} samples; "
                    f"search samples {row['search_samples']:,}; result.total_samples {row['total_samples']:,}; "
                    f"{row['wall_s']:.0f} s",
                    flush=True,
                )
    wall = time.monotonic() - started
    table = []
    for name in args.configs:
        mine = [r for r in rows if r["config"] == name]
        m, sd = mean_sd([r["winner_holdout_fid"] for r in mine])
        table.append(
            {
                "config": name,
                "runs": len(mine),
                "holdout_fid_mean": m,
                "holdout_fid_sd": sd,
                "search_samples_mean": sum(r["search_samples"] for r in mine) / len(mine),
                "total_samples_mean": sum(r["total_samples"] for r in mine) / len(mine),
                "gain_found": sum(r["gain_found"] for r in mine),
                "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
            }
        )
    base = rows[0]["baselines_holdout_fid"]
    print()
    print(
        f"MNIST DDPM, last 12 ckpts, nfe 10, budget {budget} candidates, final {final} samples on held-out seeds "
        f"{holdout}, optimiser seeds {args.seeds}"
    )
    print(
        f"{'config':24s} {'held-out FID':>15s} {'search samples':>15s} {'total samples':>14s} {'gain':>5s} "
        f"{'wall s':>7s}"
    )
    for t in table:
        print(
            f"{t['config']:24s} {t['holdout_fid_mean']:8.2f} ± {t['holdout_fid_sd']:4.2f} "
            f"{t['search_samples_mean']:15,.0f} {t['total_samples_mean']:14,.0f} {t['gain_found']:3d}/{t['runs']} "
            f"{t['wall_s_mean']:7.0f}"
        )
    print(
        "baselines at the final sample count (held-out):", ", ".join(f"{k} {v:.2f}" for k, v in base.items())
    )
    payload = {
        "benchmark": "search_fidelity",
        "quick": args.quick,
        "machine": machine,
        "wall_time_s": round(wall, 1),
        "setup": {
            "setting": "MNIST DDPM, last 12 ckpts, DDIM 10 steps, CMA bound 3 sigma 0.15",
            "budget": budget,
            "final_num_samples": final,
            "holdout_seeds": holdout,
            "optimizer_seeds": args.seeds,
            "rescore_top_k": 1,
        },
        "table": table,
        "baselines_holdout_fid": base,
        "runs": rows,
        "notes": [
            WHY_OWN_LOOP,
            conclusion(table),
            (
                "Run of 2026-11-28 on heavily shared cores (load average 40-110 on 2 cores, one 500-sample "
                "evaluation 30-70 s): the budget was cut to 12 candidates (7 of them the seed vectors), one "
                "optimiser seed and one held-out seed at 1000 samples, so the comparison is indicative only. At "
                "budget 12, [250, 1000] with keep 0.25 screens 12 x 250 and re-scores 3 x 1000 = 6,000 samples, "
                "exactly the flat-500 search's 6,000: the schedule pays off only when it screens more candidates "
                "than a flat search could afford (larger budgets), or when the final choice among near-equal "
                "candidates needs the higher-fidelity score."
            ),
            (
                "search_samples = samples of the candidates' screening and rung re-scores (from trials.parquet); "
                "result.total_samples also counts the final scores the search computed itself (baselines' held-out "
                "scores computed by an earlier run of the same setting are reused, so compare search_samples)."
            ),
        ],
    }
    path = common.write_json("search_fidelity", payload, args.quick)
    print(f"wrote {path.relative_to(ROOT)} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
