"""Multi-fidelity LCSC search: held-out FID of the winner against the samples the search generated.

Same evaluation budget (candidates screened) for each configuration, same final sample count for every
reported model (`fid.holdout_num_samples`), held-out noise seeds unseen by the search, several optimiser seeds:
- flat 500:                      every candidate scored once with 500 samples;
- SH 250->1000 keep 0.25:        screened with 250 samples, the best 25% re-scored with 1000 (the old schedule:
                                 synchronous successive halving in the driver loop);
- ASHA 128->512 eta 4 FID_inf:   screened with 128 samples, promoted to 512 by Ray Tune's AsyncHyperBandScheduler
                                 when in the best 1/4 so far, the promotion continuing the 128 samples' statistics,
                                 every score FID_inf (FID_n = FID_inf + c/n fitted over the whole, halves, quarters);
- ASHA 64->256 eta 4 FID_inf:    the same with a screen of 64 samples (FID_inf from the whole and its halves);
- SH 128->512 keep 0.25 FID_inf: synchronous successive halving on 128 -> 512, ranked by FID_inf, exactly a
                                 quarter promoted (ASHA promotes more while the optimiser keeps improving: a
                                 later candidate beats most of those scored before it).
(`--configs` also offers SH 125->250->1000 and ASHA 128->512 raw, the same rungs told raw FIDs.)
Each schedule's winners are compared with flat 500's by paired differences: over the optimiser seeds (each
seed's winner's mean held-out FID) and over every (optimiser seed, held-out seed) pair. The goal: the same
held-out FID (no loss, the interval over seed pairs ending below +1.0) with at most half the samples of flat 500.

    .venv/bin/python benchmarks/search_fidelity.py [--quick]

Runtime: per optimiser seed 96 candidates per configuration (about 48,000 samples for flat 500 and for SH, about
12,000-37,000 for the ASHA rows, about 21,500 for SH 128->512) plus 1000-sample held-out scores of each winner on 3 seeds; the earlier
flat + two-SH run took 22 minutes on quiet cores. One 500-sample DDIM-10 evaluation takes about 4 s on a quiet
core (shared/ENVIRONMENT.md), but took 155 s at load average 40-95 on these 2 cores, so a full run needs quiet
cores or more of them; --quick (budget 10, 1 seed, two configs, every sample count divided by 5) takes minutes.
Searches are cached under outputs/bench/fidelity-*/. Writes
benchmarks/results/search_fidelity.json and .md (--quick: outputs/bench/quick/).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import lcsc_setup as setup

FLAT = "flat 500"
CONFIGS = {
    FLAT: {"num_samples": 500, "search": {}},
    "SH 250->1000 keep 0.25": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [250, 1000], "keep_fraction": 0.25},
    },
    "SH 125->250->1000 keep 0.25": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [125, 250, 1000], "keep_fraction": 0.25},
    },
    "ASHA 128->512 eta 4 raw": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [128, 512], "eta": 4},
    },
    "ASHA 128->512 eta 4 FID_inf": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [128, 512], "eta": 4, "fidelity_score": "extrapolated"},
    },
    # synchronous successive halving on the ASHA rows' counts: exactly a quarter promoted, ranked by FID_inf
    "SH 128->512 keep 0.25 FID_inf": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [128, 512], "keep_fraction": 0.25, "fidelity_score": "extrapolated"},
    },
    # a screen of 2 chunks (FID_inf from the whole and its halves) at half the first rung's cost
    "ASHA 64->256 eta 4 FID_inf": {
        "num_samples": 500,
        "search": {"fidelity_schedule": [64, 256], "eta": 4, "fidelity_score": "extrapolated"},
    },
}
# every configuration samples in batches of this size (chunk j's noise depends on it); 32 gives the 128-sample
# rung 4 chunks, so FID_inf is fitted from its whole, halves and quarters
BATCH_SIZE = 32
# the old schedule (synchronous successive halving) and the new ones (asynchronous rungs scored by FID_inf);
# "ASHA 128->512 eta 4 raw" (the same rungs told raw FIDs) runs with --configs
DEFAULT_CONFIGS = [
    FLAT,
    "SH 250->1000 keep 0.25",
    "ASHA 128->512 eta 4 FID_inf",
    "ASHA 64->256 eta 4 FID_inf",
    "SH 128->512 keep 0.25 FID_inf",
]
SAME_FID_MARGIN = 1.0  # the goal's "same held-out FID": the interval over seed pairs ends below +1.0 FID
QUICK_DIVISOR = (
    5  # --quick divides every sample count by this (a smoke test of the harness, not a measurement)
)
WHY_OWN_LOOP = (
    "SH rows run successive halving in the search's driver loop (SearchRun.run_rungs) after the search phase; "
    "ASHA rows run Ray Tune's AsyncHyperBandScheduler over each candidate's cumulative sample count inside the "
    "trials. In both, a promotion continues the candidate's stored chunk statistics (it draws only the samples "
    "it adds)."
)


def scaled(config: dict, divisor: int) -> dict:
    """`config` with its screening sample count and fidelity schedule divided by `divisor`."""
    search = dict(config["search"])
    if search.get("fidelity_schedule"):
        search["fidelity_schedule"] = [n // divisor for n in search["fidelity_schedule"]]
        if search.get("eta"):  # keep the factor eta between rungs
            first = search["fidelity_schedule"][0]
            search["fidelity_schedule"] = [
                first * search["eta"] ** i for i in range(len(search["fidelity_schedule"]))
            ]
    return {"num_samples": config["num_samples"] // divisor, "search": search}


def samples_spent(out) -> int:
    """Samples drawn for the search's candidates (screening and promotions), from trials.parquet: each
    candidate's `samples_spent` at its last rung (a promotion that continues draws only what it adds)."""
    import pandas as pd

    trials = pd.read_parquet(out / "trials.parquet")
    if "samples_spent" not in trials:  # a search made before promotions continued: every row drew its count
        return int(trials[trials.status != "failed"].num_samples.fillna(0).sum())
    return int(trials.groupby("trial_id").samples_spent.max().fillna(0).sum())


def promoted_fraction(out) -> float:
    """Fraction of the scored candidates that reached a rung above the first (0 for a flat search)."""
    import pandas as pd

    trials = pd.read_parquet(out / "trials.parquet")
    scored = trials[(trials.status == "ok") & ~trials.phase.astype(str).str.startswith("rung")]
    promoted = set(trials.loc[trials.rung > 0, "trial_id"])
    return len(promoted) / max(1, len(scored))


def config_row(name: str, mine: list[dict], flat: list[dict]) -> dict:
    """A configuration's held-out FID, samples generated, and its paired difference with flat 500."""
    m, sd = setup.mean_sd([r["winner_holdout_fid"] for r in mine])
    flat_by_seed = {r["seed"]: r for r in flat}
    shared = [r for r in mine if r["seed"] in flat_by_seed]
    over_seeds = setup.paired(
        [r["winner_holdout_fid"] for r in shared],
        [flat_by_seed[r["seed"]]["winner_holdout_fid"] for r in shared],
    )
    over_pairs = setup.paired(
        [f for r in shared for f in r["winner_holdout_fids"]],
        [f for r in shared for f in flat_by_seed[r["seed"]]["winner_holdout_fids"]],
    )
    samples = sum(r["samples_spent"] for r in mine) / len(mine)
    flat_samples = sum(r["samples_spent"] for r in flat) / len(flat) if flat else float("nan")
    return {
        "config": name,
        "runs": len(mine),
        "holdout_fid_mean": m,
        "holdout_fid_sd": sd,
        "search_samples_mean": samples,
        "sample_ratio_to_flat": samples / flat_samples,
        "total_samples_mean": sum(r["total_samples"] for r in mine) / len(mine),
        "vs_flat_over_optimizer_seeds": over_seeds,
        "vs_flat_over_seed_pairs": over_pairs,
        "gain_found": sum(r["gain_found"] for r in mine),
        "promoted_fraction_mean": sum(r.get("promoted_fraction", 0.0) for r in mine) / len(mine),
        "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
    }


def goal_met(t: dict) -> bool:
    """At most half of flat 500's sample generations, no interval that says it is worse than flat, and the
    interval over seed pairs ending below +SAME_FID_MARGIN FID."""
    return (
        t["sample_ratio_to_flat"] <= 0.5
        and t["vs_flat_over_optimizer_seeds"]["verdict"] != "loss"
        and t["vs_flat_over_seed_pairs"]["verdict"] != "loss"
        and t["vs_flat_over_seed_pairs"]["high"] < SAME_FID_MARGIN
    )


def setup_note() -> str:
    """Which DDPM run the checkpoints come from (its training steps, from its summary.json)."""
    import json

    summary = setup.DDPM_DIR / "summary.json"
    steps = json.loads(summary.read_text()).get("steps") if summary.exists() else None
    return f"Checkpoints: {setup.display_path(setup.DDPM_DIR)}, a DDPM run of {steps} training steps."


def notes(table: list[dict]) -> list[str]:
    """Observations computed from the table."""
    out = []
    for t in table:
        if t["config"] == FLAT:
            continue
        out.append(
            f"{t['config']}: {t['sample_ratio_to_flat']:.2f}x flat 500's sample generations; held-out FID minus "
            f"flat's {setup.fmt_paired(t['vs_flat_over_optimizer_seeds'])} over optimiser seeds, "
            f"{setup.fmt_paired(t['vs_flat_over_seed_pairs'])} over (optimiser, held-out) seed pairs; goal "
            f"{'met' if goal_met(t) else 'not met'}."
        )
        over = t["vs_flat_over_seed_pairs"]
        if over["num_seeds"] > 1 and over["verdict"].startswith("tie"):
            need = setup.seeds_needed(over, SAME_FID_MARGIN)
            out.append(
                f"{t['config']}: 'same FID' rests on an interval {over['high'] - over['low']:.2f} FID wide; a "
                "difference smaller than that is not resolved by these seeds"
                + (
                    f" (narrower than ±{SAME_FID_MARGIN:g} FID at this spread: about {need} seed pairs)."
                    if need and need > over["num_seeds"]
                    else "."
                )
            )
        schedule = CONFIGS.get(t["config"], {}).get("search", {}).get("fidelity_schedule")
        if t["sample_ratio_to_flat"] > 0.5 and schedule:
            screen = schedule[0] / CONFIGS[FLAT]["num_samples"]
            out.append(
                f"{t['config']}: its screen costs {screen:.2f}x flat's samples and its promotions "
                f"{t['sample_ratio_to_flat'] - screen:.2f}x more ({t['promoted_fraction_mean']:.0%} of the "
                "candidates promoted), so the promotions keep it above 0.5x."
            )
    schedules = [t for t in table if t["config"] != FLAT]
    if schedules and not any(goal_met(t) for t in schedules):
        out.append("No schedule met the goal (see each row's cost and interval above).")
        cheap = [t for t in schedules if t["sample_ratio_to_flat"] <= 0.5]
        if cheap:
            best = min(cheap, key=lambda t: t["holdout_fid_mean"])
            out.append(
                f"What limits it: at 0.5x flat's samples or less, the best schedule is {best['config']} "
                f"({best['sample_ratio_to_flat']:.2f}x, {best['promoted_fraction_mean']:.0%} promoted), "
                f"{setup.fmt_paired(best['vs_flat_over_seed_pairs'])} FID over seed pairs. Its rungs are what "
                "cost it (set it beside the SH row with dearer rungs and the same share promoted): fewer samples "
                "per rung rank the candidates worse. ASHA on cheap rungs also promotes more than 1/eta (a later "
                "candidate of an improving optimiser beats most of those scored before it), which spends the "
                "samples its screen saved."
            )
    out.append(WHY_OWN_LOOP)
    out.append(setup_note())
    out.append(
        "search samples = samples drawn for the candidates' screening and promotions (trials.parquet "
        "`samples_spent`: a continued promotion counts only the samples it adds), counted even where an earlier "
        "run's identical evaluation was replayed; the final held-out scores are the same for every configuration "
        "and are not counted."
    )
    return out


def setup_line(study: dict, quick: bool) -> str:
    """What every search of the study shares, in one paragraph."""
    quick_note = f" (--quick: every sample count divided by {QUICK_DIVISOR})" if quick else ""
    return (
        f"MNIST DDPM, last 12 checkpoints, DDIM 10 steps, CMA bound 3 sigma 0.15, budget {study['budget']} "
        f"candidates; winners re-scored at {study['final_num_samples']} samples on held-out seeds "
        f"{study['holdout_seeds']}; optimiser seeds {study['optimizer_seeds']}; batches of "
        f"{study['batch_size']} samples{quick_note}."
    )


def table_markdown(table: list[dict]) -> str:
    """The configurations' table, generated from the measured values."""
    lines = [
        (
            "| config | runs | held-out FID mean ± sd | search samples | x flat | minus flat, over seeds | "
            "minus flat, over seed pairs | promoted | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['config']} | {t['runs']} | {t['holdout_fid_mean']:.2f} ± {t['holdout_fid_sd']:.2f} | "
            f"{t['search_samples_mean']:,.0f} | {t['sample_ratio_to_flat']:.2f} | "
            f"{setup.fmt_paired(t['vs_flat_over_optimizer_seeds'])} | {setup.fmt_paired(t['vs_flat_over_seed_pairs'])} | "
            f"{t['promoted_fraction_mean']:.2f} | {t['wall_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    cli = harness.parser(__doc__, seeds=[0, 1, 2], quick_seeds=[0])
    cli.add_argument("--budget", type=int, default=None, help="candidates per search (default 96; quick 10)")
    cli.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    cli.add_argument("--batch-size", type=int, default=None, help=f"default {BATCH_SIZE} (quick 8)")
    cli.add_argument("--final-samples", type=int, default=None, help="default 1000 (quick 200)")
    cli.add_argument("--holdout-seeds", type=int, nargs="+", default=None, help="default 1001-1003 (quick 2)")
    args = cli.parse_args()
    quick = args.quick
    budget = args.budget or (10 if quick else 96)
    holdout = args.holdout_seeds or ([1001, 1002] if quick else [1001, 1002, 1003])
    names = args.configs or ([FLAT, "ASHA 128->512 eta 4 FID_inf"] if quick else DEFAULT_CONFIGS)
    if FLAT not in names:
        cli.error(f"--configs must include {FLAT!r}: every schedule is compared with it")
    final = args.final_samples or (1000 // QUICK_DIVISOR if quick else 1000)
    batch = args.batch_size or (8 if quick else BATCH_SIZE)
    configs = {n: scaled(CONFIGS[n], QUICK_DIVISOR) if quick else CONFIGS[n] for n in names}
    tag = "quick" if quick else f"b{budget}-h{len(holdout)}x{final}"
    setup.ensure_trained()
    with setup.LocalRay() as local_ray:
        record = setup.record(args)

        def measure(name: str, config: dict, seed: int) -> dict:
            row, out = setup.study_search(
                "fidelity",
                tag,
                name,
                seed,
                local_ray,
                batch_size=batch,
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
            return row | {"samples_spent": samples_spent(out), "promoted_fraction": promoted_fraction(out)}

        sweep = harness.Sweep(
            "search_fidelity", configs=configs, seeds=harness.chosen_seeds(args), measure=measure
        )
        # the searches themselves are cached (outputs/bench/fidelity-<tag>/): the rows are read again from them
        rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)
    flat = [r for r in rows if r["config"] == FLAT]
    table = [config_row(n, [r for r in rows if r["config"] == n], flat) for n in names]
    study = {
        "setting": "MNIST DDPM, last 12 ckpts, DDIM 10 steps, CMA bound 3 sigma 0.15",
        "budget": budget,
        "final_num_samples": final,
        "holdout_seeds": holdout,
        "optimizer_seeds": list(sweep.seeds),
        "configs": configs,
        "batch_size": batch,
        "rescore_top_k": 1,
    }
    sweep = dataclasses.replace(sweep, describe=setup_line(study, quick))
    sweep.extra.update(
        setup=study,
        complete=len(rows) == len(names) * len(sweep.seeds),
        table=table,
        baselines_holdout_fid=setup.baselines_of(rows),
    )
    paired = [
        harness.paired_table(rows, "winner_holdout_fid", baseline=FLAT, better="lower"),
        harness.paired_table(rows, "samples_spent", baseline=FLAT, better="lower"),
    ]
    harness.finish(
        sweep,
        args,
        record,
        rows,
        paired=paired,
        notes=notes(table),
        title="Multi-fidelity LCSC search",
        sections=[("Configurations", table_markdown(table))],
    )


if __name__ == "__main__":
    main()
