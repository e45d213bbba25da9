"""The LCSC paper's claims, in shape, on the MNIST recipes: each claim one row with our measured numbers.

  a. quality   LCSC vs the run's EMA and last checkpoint: the DDPM at DDIM 10 steps, the consistency
               model (CM) at 1 step;
  b. training  LCSC over the checkpoints of the first 28% of the DDPM run (steps 100..700 of 2500) vs the
               fully trained model's EMA;
  c. NFE       the CM with LCSC at 1 step vs the base CM (EMA, last) at 2 steps; the DDPM with LCSC at
               6 steps vs the base DDPM at 10 steps.

Every FID is the mean over held-out noise seeds (unseen by the search) at 500 samples, on the recipe's
MNIST classifier features; LCSC rows are mean ± sd over optimiser seeds. Run from the repository root:

    .venv/bin/python benchmarks/paper_claims.py [--quick]

Searches whose spec equals one of benchmarks/search_optimizers.py's (the DDPM at 10 steps with the
default optimiser) are loaded from its outputs instead of re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_optimizers as common
from search_optimizers import BENCH_OUT, CM_DIR, DDPM_DIR, HOLDOUT_SEEDS, ROOT, mean_sd

DEFAULT_ALGO = {"optimizer": "CMA", "bound": 3.0, "sigma": 0.15}


def searches(
    tag: str,
    budget: int,
    seeds: list[int],
    holdout: list[int],
    algo: dict,
    dm_seeds: list[int] | None = None,
    run_missing: bool = False,
    early: tuple[int, list[int]] | None = None,
) -> dict[str, list[dict]]:
    """Run (or load) the searches behind the rows; name -> one summary row per optimiser seed."""
    early_paths = [f"ckpt_{step:06d}.safetensors" for step in range(100, 800, 100)]
    setups = {
        "cm_nfe1": {"run_dir": CM_DIR, "cm": True, "nfe": 1},
        "ddpm_nfe6": {"nfe": 6},
        "ddpm_early_nfe10": {"paths": early_paths, "nfe": 10},
        "ddpm_nfe10": {"nfe": 10},
    }
    out: dict[str, list[dict]] = {}
    for name, setup in setups.items():
        out[name] = []
        for seed in dm_seeds if dm_seeds is not None and name in ("ddpm_nfe6", "ddpm_early_nfe10") else seeds:
            if name == "ddpm_nfe10":  # identical to search_optimizers' default-config runs: reuse them
                slug = "CMA_b3_s015" if algo == DEFAULT_ALGO else "default"
                path = BENCH_OUT / f"optimizers-{tag}" / f"{slug}-seed{seed}"
                waited = time.monotonic()  # search_optimizers.py may be running it right now: wait a while
                while (
                    path.exists() and not (path / "result.json").exists() and time.monotonic() - waited < 1500
                ):
                    time.sleep(10)
                if not (path / "result.json").exists() and not run_missing:
                    print(f"{name} seed {seed}: no search_optimizers run at {path}; skipped", flush=True)
                    continue
            else:
                path = BENCH_OUT / f"claims-{tag}" / f"{name}-seed{seed}"
            b, h = budget, holdout
            if name == "ddpm_early_nfe10" and early is not None:
                b, h = early
                path = path.with_name(f"{path.name}-b{b}-h{len(h)}")
            spec = common.make_spec(
                str(path), seed=seed, holdout_seeds=h, budget=b, rescore_top_k=1, **setup, **algo
            )
            row = common.run_cached_search(spec)
            out[name].append(row)
            print(
                f"{name} seed {seed}: LCSC held-out {row['winner_holdout_fid']:.2f}; baselines "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["baselines_holdout_fid"].items())
                + f"; gain {row['gain_found']}; {row['wall_s']:.0f} s",
                flush=True,
            )
    return out


def base_scores(cm: bool, nfe: int, holdout: list[int], last: int = 12) -> dict:
    """Held-out FIDs of the run's EMA and its last checkpoint at `nfe`, straight on the evaluator API."""
    import ray

    from lcsc_ray import coefficients as coef
    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.evaluator import start_evaluators
    from lcsc_ray.fid import reference_stats_for
    from schemas.search import SearchSpec

    run_dir = CM_DIR if cm else DDPM_DIR
    out = BENCH_OUT / "claims-base" / f"{'cm' if cm else 'ddpm'}_nfe{nfe}"
    ref_cache = BENCH_OUT / "cache" / "reference_stats"
    if ref_cache.exists() and not (out / "reference_stats").exists():
        import shutil

        shutil.copytree(ref_cache, out / "reference_stats")
    spec = SearchSpec.model_validate(
        common.make_spec(str(out), run_dir=run_dir, cm=cm, nfe=nfe, last=last, holdout_seeds=holdout)
    )
    started = time.monotonic()
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    evaluators = start_evaluators(spec, checkpoint_set, reference_stats_for(spec))
    try:
        jobs = [
            (label, alphas, seed)
            for label, alphas in (("run-ema", None), ("last", coef.last_checkpoint(last).tolist()))
            for seed in holdout
        ]
        refs = [
            evaluators[i % len(evaluators)].evaluate.remote(alphas, 500, seed, raise_nonfinite=False)
            for i, (_, alphas, seed) in enumerate(jobs)
        ]
        fids = [float(r["fid"]) for r in ray.get(refs)]
    finally:
        for actor in evaluators:
            ray.kill(actor)
    scores = {}
    for (label, _, _), fid in zip(jobs, fids):
        scores.setdefault(label, []).append(fid)
    return {
        "holdout_fids": scores,
        "holdout_fid": {k: float(np.mean(v)) for k, v in scores.items()},
        "evaluations": len(jobs),
        "wall_s": round(time.monotonic() - started, 1),
    }


def lcsc_cell(rows: list[dict]) -> dict:
    m, sd = mean_sd([r["winner_holdout_fid"] for r in rows])
    return {
        "mean": m,
        "sd": sd,
        "per_seed": [r["winner_holdout_fid"] for r in rows],
        "gain_found": [r["gain_found"] for r in rows],
    }


def baseline_cell(rows: list[dict], prefix: str) -> float:
    values = [v for r in rows for k, v in r["baselines_holdout_fid"].items() if k.startswith(prefix)]
    return float(np.mean(values)) if values else float("nan")  # deterministic: equal across optimiser seeds


def cost(rows: list[dict]) -> dict:
    return {
        "budget_per_search": rows[0]["budget"],
        "searches": len(rows),
        "evaluations": sum(r["num_evaluations"] for r in rows),
        "search_samples": sum(r["search_samples"] for r in rows),
        "wall_s": round(sum(r["wall_s"] for r in rows), 1),
    }


def build_rows(runs: dict[str, list[dict]], cm_nfe2: dict) -> list[dict]:
    rows = []

    def add(
        claim: str,
        paper: str,
        setting: str,
        lcsc_rows: list[dict],
        compare: dict[str, float],
        target: str,
        extra_cost: dict | None = None,
    ):
        cell = lcsc_cell(lcsc_rows)
        best_other = min(compare.values())
        rows.append(
            {
                "claim": claim,
                "paper": paper,
                "setting": setting,
                "lcsc_holdout_fid": cell,
                "compared_holdout_fid": compare,
                "target": target,
                "reproduced": bool(cell["mean"] < compare[target]),
                "beats_every_compared": bool(cell["mean"] < best_other),
                "cost": cost(lcsc_rows) | ({"extra": extra_cost} if extra_cost else {}),
            }
        )

    ddpm, cm = runs["ddpm_nfe10"], runs["cm_nfe1"]
    add(
        "a. quality (DM)",
        "LCSC beats EMA and last at the same NFE",
        "DDPM, last 12 ckpts, DDIM 10 steps",
        ddpm,
        {
            "run EMA": baseline_cell(ddpm, "run-ema"),
            "last": baseline_cell(ddpm, "last"),
            "best sparse EMA": baseline_cell(ddpm, "best-sparse"),
        },
        "run EMA",
    )
    add(
        "a. quality (CM)",
        "LCSC beats EMA and last at 1 step",
        "CM, last 12 ckpts, 1 step",
        cm,
        {
            "run EMA": baseline_cell(cm, "run-ema"),
            "last": baseline_cell(cm, "last"),
            "best sparse EMA": baseline_cell(cm, "best-sparse"),
        },
        "run EMA",
    )
    early = runs["ddpm_early_nfe10"]
    add(
        "b. training cost",
        "LCSC on a short run matches the fully trained model (23x CM / CIFAR-10)",
        "DDPM ckpts 100..700 of 2500 (28% of the steps), DDIM 10 steps",
        early,
        {
            "full-run EMA": baseline_cell(ddpm, "run-ema"),
            "full-run last": baseline_cell(ddpm, "last"),
            "early last (step 700)": baseline_cell(early, "last"),
        },
        "full-run EMA",
    )
    add(
        "c. NFE (CM)",
        "LCSC at 1 step beats the base at 2 steps",
        "CM: LCSC at 1 step vs base at 2 steps",
        cm,
        {"EMA @2 steps": cm_nfe2["holdout_fid"]["run-ema"], "last @2 steps": cm_nfe2["holdout_fid"]["last"]},
        "EMA @2 steps",
        extra_cost={"base_evaluations": cm_nfe2["evaluations"], "wall_s": cm_nfe2["wall_s"]},
    )
    nfe6 = runs["ddpm_nfe6"]
    add(
        "c. NFE (DM)",
        "LCSC at fewer steps matches the base at more (15 -> 9 on CIFAR-10)",
        "DDPM: LCSC at 6 steps vs base at 10 steps",
        nfe6,
        {
            "EMA @10": baseline_cell(ddpm, "run-ema"),
            "last @10": baseline_cell(ddpm, "last"),
            "EMA @6": baseline_cell(nfe6, "run-ema"),
            "last @6": baseline_cell(nfe6, "last"),
        },
        "EMA @10",
    )
    return rows


def fmt(cell: dict) -> str:
    return f"{cell['mean']:.2f} ± {cell['sd']:.2f}" if len(cell["per_seed"]) > 1 else f"{cell['mean']:.2f}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        (
            "| claim | setting | LCSC held-out FID | compared (held-out FID) | reproduced? | "
            "search budget | wall s |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compared = "; ".join(f"{k} {v:.2f}" for k, v in r["compared_holdout_fid"].items())
        verdict = ("yes" if r["reproduced"] else "no") + f" (vs {r['target']})"
        c = r["cost"]
        lines.append(
            f"| {r['claim']} | {r['setting']} | {fmt(r['lcsc_holdout_fid'])} | {compared} | {verdict} | "
            f"{c['searches']} × {c['budget_per_search']} evals | {c['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="budget 12, 1 seed, 1 held-out seed")
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="optimiser seeds (CM; DDPM at 10)"
    )
    parser.add_argument(
        "--dm-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="optimiser seeds of the costlier DDPM searches (6 steps; early checkpoints)",
    )
    parser.add_argument(
        "--run-missing",
        action="store_true",
        help="run the DDPM 10-step searches here when search_optimizers.py has not",
    )
    parser.add_argument(
        "--early-budget",
        type=int,
        default=None,
        help="a smaller budget for the early-checkpoint search (crowded cores)",
    )
    parser.add_argument("--early-holdout", type=int, nargs="+", default=[1001])
    args = parser.parse_args()
    tag = "quick" if args.quick else "full"
    budget = 12 if args.quick else args.budget
    seeds = [0] if args.quick else args.seeds
    holdout = [1001] if args.quick else HOLDOUT_SEEDS
    common.ensure_trained(cm=True)
    started = time.monotonic()
    with common.ray_context():
        machine = common.machine_info()
        base_file = BENCH_OUT / f"claims-{tag}" / "cm_base_nfe2.json"
        previous = common.RESULTS / "paper_claims.json"
        if base_file.exists():
            cm_nfe2 = json.loads(base_file.read_text())
        elif not args.quick and previous.exists() and "cm_base_nfe2" in json.loads(previous.read_text()):
            cm_nfe2 = json.loads(previous.read_text())["cm_base_nfe2"]  # deterministic: reuse the last run's
        else:
            common.start_ray()
            cm_nfe2 = base_scores(cm=True, nfe=2, holdout=holdout)
            base_file.parent.mkdir(parents=True, exist_ok=True)
            base_file.write_text(json.dumps(cm_nfe2))
        print(f"CM base at 2 steps: {cm_nfe2['holdout_fid']}", flush=True)
        runs = searches(
            tag,
            budget,
            seeds,
            holdout,
            DEFAULT_ALGO,
            None if args.quick else args.dm_seeds,
            run_missing=args.run_missing,
            early=(args.early_budget, args.early_holdout) if args.early_budget else None,
        )
    wall = time.monotonic() - started
    rows = build_rows(runs, cm_nfe2)
    header = (
        f"LCSC paper claims on MNIST (500-sample FIDs, classifier features, held-out seeds {holdout}; "
        f"LCSC = CMA bound 3 sigma 0.15, budget {budget} incl. 7 seed vectors, optimiser seeds {seeds}, "
        f"{args.dm_seeds} for the DDPM at 6 steps and on early checkpoints)"
    )
    table = markdown(rows, header)
    print()
    print(table)
    notes = notes_for(rows)
    for note in notes:
        print("-", note)
    payload = {
        "benchmark": "paper_claims",
        "quick": args.quick,
        "machine": machine,
        "wall_time_s_this_invocation": round(wall, 1),
        "search_wall_s_total": round(sum(r["wall_s"] for rs in runs.values() for r in rs), 1),
        "setup": {
            "search_num_samples": 500,
            "final_num_samples": 500,
            "holdout_seeds": holdout,
            "budget": budget,
            "optimizer_seeds": seeds,
            "dm_seeds": args.dm_seeds,
            "algo": DEFAULT_ALGO,
            "evaluators": 2,
        },
        "rows": rows,
        "cm_base_nfe2": cm_nfe2,
        "runs": {k: v for k, v in runs.items()},
        "notes": notes,
    }
    path = common.write_json("paper_claims", payload, args.quick)
    md_dir = path.parent
    (md_dir / "paper_claims.md").write_text(table + "\nNotes:\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"wrote {path.relative_to(ROOT)} and paper_claims.md ({wall:.0f} s)")


INTERPRETATION = [  # written after reading the 2026-11-28 run; the numbers above are regenerated by the script
    (
        "a (DM) holds in direction but within noise: with optimiser seeds 0 and 1 the winners score 71.2 and "
            "66.8 held out (69.0 ± 3.1) vs the run's online EMA 70.6 (decay 0.999 over every step, outside the "
            "search space), and both beat every vector the search can represent (last 94.7, best sparse EMA 77.2, "
            "uniform 75.1). Seed 0's winner ties the EMA (72.1/67.7/73.8 vs 72.1/68.8/70.8 per held-out seed); seed "
        "1's beats it on every held-out seed (68.1/64.0/68.3)."
    ),
    (
        "Why c (CM) fails: our consistency model is a 1,000-step distillation of a small MNIST DDPM; 2-step "
            "sampling improves it by ~29 FID (108.4 -> 79.4), far more than LCSC gains at 1 step (~3 FID). In the "
            "paper the CM's 1->2-step gap is small next to LCSC's 1-step gain; here it is the opposite. Claim a (CM) "
        "does reproduce in direction: LCSC beats EMA, last and sparse EMA at 1 step, in both optimiser seeds."
    ),
    (
        "Why c (DM) fails: DDIM with 6 vs 10 steps costs ~29 FID for this v-prediction U-Net (EMA 99.8 vs 70.6); "
        "LCSC tuned at 6 steps beats last (128.7) and the best sparse EMA (108.1) at 6 steps but not the run EMA "
        "at 6 steps (99.8), with 17 optimiser evaluations."
    ),
    (
        "Why b fails: steps 100..700 are early, far-from-converged weights (the last of them scores 146 vs 95 "
        "for the step-2500 checkpoint); LCSC over them improves the early run (132.9 vs 146.2 last and 136.9 best "
        "sparse EMA, on held-out seed 1001 with a 12-evaluation budget) but is nowhere near the fully trained EMA "
        "(70.6; 72.1 on seed 1001). The paper's speed-up comes from combining checkpoints of a converging CM run "
        "with a far larger search budget."
    ),
    (
        "Budget and load: the cores were shared with several other Ray jobs (load average 40-110 on 2 cores), so "
        "one 500-sample evaluation took 30-70 s instead of ~4.5 s; budgets were cut to 24 (12 for b) and the 6-step and "
        "early-checkpoint DDPM rows to one optimiser seed. Rerunning with `--budget 48 --seeds 0 1 2 --dm-seeds 0 1` on quiet "
        "cores is the next step; the FIDs themselves are deterministic given the seeds."
    ),
]


def notes_for(rows: list[dict]) -> list[str]:
    """Honest reading of each row (generated from the numbers, then refined by hand in the report)."""
    notes = [
        (
            "FIDs here use a small MNIST classifier's features and 500 samples: biased and noisy, comparable only "
            "at equal sample counts and seeds; the paper uses Inception features and 50k samples on CIFAR-10 / "
            "ImageNet-64. Only the direction of each claim can be checked."
        ),
        (
            "Search budgets are tiny next to the paper's (thousands of candidate evaluations): each search here "
            "spends its budget including 7 seed vectors (last, EMA-shaped 0.5..0.95, uniform), on shared cores."
        ),
    ]
    for r in rows:
        cell, comp = r["lcsc_holdout_fid"], r["compared_holdout_fid"]
        target = comp[r["target"]]
        gains = sum(cell["gain_found"])
        status = "reproduced" if r["reproduced"] else "NOT reproduced"
        notes.append(
            f"{r['claim']}: {status} — LCSC {fmt(cell)} vs {r['target']} {target:.2f} "
            f"(best compared {min(comp.values()):.2f}); the search found a non-seed improvement in "
            f"{gains}/{len(cell['gain_found'])} seeds."
        )
    return notes + INTERPRETATION


if __name__ == "__main__":
    main()
