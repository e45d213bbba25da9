"""LCSC search: which Nevergrad optimiser, bounds and initial step size should be the default?

Side by side on the MNIST DDPM recipe (last 12 checkpoints, DDIM at 10 steps, 500-sample FIDs during the
search): each optimiser configuration runs the real `run_search` with the same evaluation budget for several
optimiser seeds (`spec.seed`); each winner is re-scored on held-out noise seeds by the search itself, beside
the baselines (last checkpoint, best sparse EMA, uniform soup, run EMA), and compared with each of them by
the paired 95% interval over those seeds. Configurations are compared with the default (CMA b3 s0.15) by a
paired interval over the optimiser seeds (each seed's winner's mean held-out FID).

    .venv/bin/python benchmarks/search_optimizers.py [--quick]

Runtime: the full run is about 950 evaluations counted in 500-sample units (9 searches of 96 plus the held-out
1000-sample scores; the CMA searches replay search_fidelity's flat-500 trials when those ran first), about 32
minutes on two evaluators on quiet cores; --quick (2 configs, 1 seed, budget 10, 100-sample FIDs) a small
fraction of it. One 500-sample DDIM-10 evaluation takes about 4 s on a quiet core (shared/ENVIRONMENT.md), but took 155 s (250
samples: 75-117 s) at load average 40-95 on these 2 cores (2026-11-29), so a full run needs quiet cores or more of them.
Searches are cached under outputs/bench/optimizers-*/, so a rerun only does what is missing. Writes
benchmarks/results/search_optimizers.json and .md (--quick: outputs/bench/quick/).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import lcsc_setup as setup

CONFIGS = {  # name -> SearchAlgoSpec overrides
    "CMA b3 s0.15": {"optimizer": "CMA", "bound": 3.0, "sigma": 0.15},
    "TwoPointsDE b2": {"optimizer": "TwoPointsDE", "bound": 2.0, "sigma": 0.15},
    "NGOpt b3 s0.15": {"optimizer": "NGOpt", "bound": 3.0, "sigma": 0.15},
    "CMA b3 s0.3": {"optimizer": "CMA", "bound": 3.0, "sigma": 0.3},
    "CMA b2 s0.1": {"optimizer": "CMA", "bound": 2.0, "sigma": 0.1},
    # optimisers that fit a model of the objective, at half the evaluations (`budget_fraction`)
    "MetaModel b3 s0.15 half": {
        "optimizer": "MetaModel",
        "bound": 3.0,
        "sigma": 0.15,
        "budget_fraction": 0.5,
    },
    "ChainMetaModelSQP b3 s0.15 half": {
        "optimizer": "ChainMetaModelSQP",
        "bound": 3.0,
        "sigma": 0.15,
        "budget_fraction": 0.5,
    },
    "CMA b3 s0.15 half": {"optimizer": "CMA", "bound": 3.0, "sigma": 0.15, "budget_fraction": 0.5},
}
DEFAULT_CONFIG = "CMA b3 s0.15"
HOLDOUT_SEEDS = [1001, 1002, 1003, 1004, 1005]
SAME_FID_MARGIN = 1.0  # "the same held-out FID": a difference this small is what a comparison should resolve


def config_row(name: str, mine: list[dict], default_rows: list[dict]) -> dict:
    """One table row: held-out FID over optimiser seeds, paired verdicts against the baselines, and the
    paired difference with the default configuration over the optimiser seeds both ran."""
    m, sd = setup.mean_sd([r["winner_holdout_fid"] for r in mine])
    sm, ssd = setup.mean_sd([r["winner_search_fid"] for r in mine])
    wins = {}
    for r in mine:
        for label, c in r["comparisons"].items():
            wins.setdefault(label, 0)
            wins[label] += int(c["high"] is not None and c["high"] < 0)
    by_seed = {r["seed"]: r["winner_holdout_fid"] for r in default_rows}
    shared = [r for r in mine if r["seed"] in by_seed]
    vs_default = setup.paired([r["winner_holdout_fid"] for r in shared], [by_seed[r["seed"]] for r in shared])
    return {
        "config": name,
        **CONFIGS[name],
        "runs": len(mine),
        "holdout_fid_mean": m,
        "holdout_fid_sd": sd,
        "search_fid_mean": sm,
        "search_fid_sd": ssd,
        "gain_found": sum(r["gain_found"] for r in mine),
        "paired_wins_vs_baseline": wins,
        "vs_default": vs_default,
        "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
    }


def setup_line(setup_: dict) -> str:
    """What every search of the study shares, in one paragraph."""
    return (
        f"MNIST DDPM, last 12 checkpoints, DDIM {setup_['nfe']} steps, budget {setup_['budget']} (7 seed vectors "
        f"included; 'half' configurations half of it), {setup_['search_num_samples']}-sample search FIDs in "
        f"batches of {setup_.get('batch_size') or 250}, held-out seeds {setup_['holdout_seeds']} at "
        f"{setup_['holdout_num_samples']} samples; optimiser seeds {setup_['optimizer_seeds']}."
    )


def table_markdown(payload: dict) -> str:
    """The configurations' table and the baselines, generated from the measured values."""
    lines = [
        "| config | runs | held-out FID mean ± sd | search FID | gain found | minus default [95% CI] | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in payload["table"]:
        lines.append(
            f"| {t['config']} | {t['runs']} | {t['holdout_fid_mean']:.2f} ± {t['holdout_fid_sd']:.2f} | "
            f"{t['search_fid_mean']:.2f} | {t['gain_found']}/{t['runs']} | {setup.fmt_paired(t['vs_default'])} | "
            f"{t['wall_s_mean']:.0f} |"
        )
    base = payload["baselines_holdout_fid"]
    lines += ["", "Baselines (held-out mean): " + ", ".join(f"{k} {v:.2f}" for k, v in base.items())]
    return "\n".join(lines)


def notes(payload: dict) -> list[str]:
    """Observations computed from the table (no fixed prose about numbers)."""
    table = payload["table"]
    out = []
    best = min(table, key=lambda t: t["holdout_fid_mean"])
    out.append(f"Lowest mean held-out FID: {best['config']} ({best['holdout_fid_mean']:.2f}).")
    for t in table:
        if t["config"] == DEFAULT_CONFIG or t["vs_default"]["num_seeds"] < 2:
            continue
        v = t["vs_default"]["verdict"]
        word = {"win": "better than", "loss": "worse than"}.get(v, "not separable from")
        out.append(
            f"{t['config']} is {word} {DEFAULT_CONFIG} over {t['vs_default']['num_seeds']} optimiser seeds "
            f"({setup.fmt_paired(t['vs_default'])})."
        )
        need = setup.seeds_needed(t["vs_default"], SAME_FID_MARGIN)
        if v == "tie" and need is not None and need > t["vs_default"]["num_seeds"]:
            out.append(
                f"{t['config']}: what limits the comparison is the spread of the winners over optimiser seeds; at "
                f"the spread measured, an interval narrower than ±{SAME_FID_MARGIN:g} FID needs about {need} "
                "optimiser seeds."
            )
    for t in table:
        wins = ", ".join(f"{k} {n}/{t['runs']}" for k, n in t["paired_wins_vs_baseline"].items())
        out.append(f"{t['config']}: winners whose paired held-out interval lies below the baseline: {wins}.")
    out.append(
        "FIDs use the recipe's MNIST classifier features; they are deterministic given the seeds. Wall times "
        "depend on the load of the shared cores and on replayed evaluations (shared seed vectors, baselines), "
        "so compare FIDs, not times."
    )
    return out


def main() -> None:
    cli = harness.parser(__doc__, seeds=[0, 1, 2], quick_seeds=[0])
    cli.add_argument("--budget", type=int, default=None, help="evaluations per search (default 96; quick 10)")
    cli.add_argument("--holdout-seeds", type=int, nargs="+", default=None)
    cli.add_argument("--holdout-samples", type=int, default=None, help="samples per held-out score")
    cli.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS), help="names from CONFIGS")
    cli.add_argument(
        "--skip-missing", action="store_true", help="tabulate finished searches only; run nothing"
    )
    cli.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluators.batch_size (search_fidelity.py uses 32: its flat-500 CMA searches then replay here)",
    )
    args = cli.parse_args()
    quick = args.quick
    configs = args.configs or ([DEFAULT_CONFIG, "TwoPointsDE b2"] if quick else list(CONFIGS)[:3])
    if DEFAULT_CONFIG not in configs:
        cli.error(f"--configs must include the default {DEFAULT_CONFIG!r}: every config is paired with it")
    budget = args.budget or (10 if quick else 96)
    holdout = args.holdout_seeds or ([1001, 1002] if quick else HOLDOUT_SEEDS)
    holdout_samples = args.holdout_samples or (200 if quick else 1000)
    search_samples = 100 if quick else 500
    tag = "quick" if quick else f"b{budget}-h{len(holdout)}x{holdout_samples}"
    setup.ensure_trained()
    with setup.LocalRay() as local_ray:
        record = setup.record(args)

        def measure(name: str, overrides: dict, seed: int) -> dict | None:
            folder = setup.study_dir("optimizers", tag, name, seed)
            if args.skip_missing and not (folder / "result.json").exists():
                return None
            algo = dict(overrides)
            fraction = algo.pop("budget_fraction", 1.0)
            row, _ = setup.study_search(
                "optimizers",
                tag,
                name,
                seed,
                local_ray,
                batch_size=args.batch_size,
                num_samples=search_samples,
                holdout_seeds=holdout,
                holdout_num_samples=holdout_samples,
                budget=max(8, round(budget * fraction)),
                rescore_top_k=1,
                **algo,
            )
            return row

        sweep = harness.Sweep(
            "search_optimizers",
            configs={name: CONFIGS[name] for name in configs},
            seeds=harness.chosen_seeds(args),
            measure=measure,
            describe="",
        )
        # the searches themselves are cached (outputs/bench/optimizers-<tag>/): the rows are read again from them
        rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)
    default_rows = [r for r in rows if r["config"] == DEFAULT_CONFIG]
    table = [
        config_row(name, [r for r in rows if r["config"] == name], default_rows)
        for name in configs
        if any(r["config"] == name for r in rows)
    ]
    study = {
        "recipe": "MNIST DDPM (v-pred, cosine), outputs/bench/mnist-ddpm",
        "checkpoints": "last 12",
        "sampler": "ddim_sample",
        "nfe": 10,
        "search_num_samples": search_samples,
        "holdout_seeds": holdout,
        "holdout_num_samples": holdout_samples,
        "budget": budget,
        "optimizer_seeds": list(sweep.seeds),
        "configs": configs,
        "evaluators": 2,
        "batch_size": args.batch_size,
        "rescore_top_k": 1,
    }
    payload = {"table": table, "baselines_holdout_fid": setup.baselines_of(rows)}  # the runs are the rows
    sweep = dataclasses.replace(sweep, describe=setup_line(study))
    sweep.extra.update(setup=study, complete=len(rows) == len(configs) * len(sweep.seeds), **payload)
    paired = harness.paired_table(rows, "winner_holdout_fid", baseline=DEFAULT_CONFIG, better="lower")
    harness.finish(
        sweep,
        args,
        record,
        rows,
        paired=[paired],
        notes=notes(payload),
        title="LCSC search: optimiser configurations",
        sections=[("Configurations", table_markdown(payload))],
    )


if __name__ == "__main__":
    main()
