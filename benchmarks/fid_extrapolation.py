"""How close FID_inf fitted from a few hundred samples comes to the FID of many samples (MNIST DDPM recipe).

For several coefficient vectors of the LCSC search (the seed vectors: last checkpoint, EMA-shaped, uniform), each
scored on `--seeds` noise seeds as the search scores them (continued jobs: N samples in chunk blocks, FID of the
whole, halves and quarters, FID_N = FID_inf + c/N fitted), against one `--reference-samples` FID of the same
vector on another seed. Reports, over (vector, seed) pairs, the error of raw FID_N and of FID_inf against the
reference (mean with a paired 95% interval, `rayops.paired`), and over vectors whether the ranking by FID_inf at
N matches the ranking by the reference.

    .venv/bin/python benchmarks/fid_extrapolation.py [--quick]

Writes benchmarks/results/fid_extrapolation.json and .md (--quick: outputs/bench/quick/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lcsc_setup as setup


def measure(args) -> dict:
    """Score every vector at each N (continued) on each seed and once at the reference count."""
    from scipy.stats import spearmanr

    from lcsc_ray import coefficients as coef
    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.evaluation_store import EvaluationStore
    from lcsc_ray.fid import reference_stats_for
    from lcsc_ray.pool import EvaluatorPool, Job
    from rayops.progress import ProgressLine
    from schemas.search import SearchSpec

    out = setup.BENCH_OUT / ("fid-extrapolation-quick" if args.quick else "fid-extrapolation")
    spec_dict = setup.make_spec(str(out), num_samples=args.counts[0])
    spec_dict["evaluators"]["batch_size"] = args.batch_size
    spec = SearchSpec.model_validate(spec_dict)
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    vectors = [v for v in coef.seed_vectors(len(checkpoint_set), spec) if v[0] in args.vectors]
    store = EvaluationStore(str(out / "state" / "evaluations"), identity=f"bench-b{args.batch_size}")
    pool = EvaluatorPool(spec, checkpoint_set, reference_stats_for(spec), store)
    try:
        jobs = [Job.of(a, args.reference_samples, args.reference_seed) for _, a in vectors]
        reference = pool.score(jobs, ProgressLine("reference FIDs", total=len(jobs)))
        scored = {}
        for n in sorted(args.counts):  # smaller first: the larger continue its blocks
            jobs = [Job.of(a, n, s, continued=True) for _, a in vectors for s in args.seeds]
            scored[n] = pool.score(jobs, ProgressLine(f"{n}-sample scores", total=len(jobs)))
    finally:
        pool.close()
    rows = []
    for n, records in scored.items():
        it = iter(records)
        for (label, _), ref in zip(vectors, reference):
            for seed in args.seeds:
                r = next(it)
                rows.append(
                    {
                        "label": label,
                        "n": n,
                        "seed": seed,
                        "fid_raw": r["fid"],
                        "fid_inf": r["fid_inf"],
                        "fit_points": r["fit_points"],
                        "reference_fid": ref["fid"],
                    }
                )
    summary = []
    for n in sorted(args.counts):
        mine = [r for r in rows if r["n"] == n]
        refs = [r["reference_fid"] for r in mine]
        by_label = {}
        for r in mine:
            by_label.setdefault(r["label"], []).append(r)
        ref_of = {label: rs[0]["reference_fid"] for label, rs in by_label.items()}
        inf_mean = {label: float(np.mean([r["fid_inf"] for r in rs])) for label, rs in by_label.items()}
        raw_mean = {label: float(np.mean([r["fid_raw"] for r in rs])) for label, rs in by_label.items()}
        labels = list(by_label)
        summary.append(
            {
                "n": n,
                "raw_minus_reference": setup.paired([r["fid_raw"] for r in mine], refs),
                "inf_minus_reference": setup.paired([r["fid_inf"] for r in mine], refs),
                "abs_error_raw_mean": float(np.mean([abs(r["fid_raw"] - r["reference_fid"]) for r in mine])),
                "abs_error_inf_mean": float(np.mean([abs(r["fid_inf"] - r["reference_fid"]) for r in mine])),
                "inf_sd_over_seeds_mean": float(
                    np.mean([np.std([r["fid_inf"] for r in rs], ddof=1) for rs in by_label.values()])
                ),
                "raw_sd_over_seeds_mean": float(
                    np.mean([np.std([r["fid_raw"] for r in rs], ddof=1) for rs in by_label.values()])
                ),
                "spearman_inf_vs_reference": float(
                    spearmanr([inf_mean[k] for k in labels], [ref_of[k] for k in labels]).statistic
                ),
                "spearman_raw_vs_reference": float(
                    spearmanr([raw_mean[k] for k in labels], [ref_of[k] for k in labels]).statistic
                ),
            }
        )
    return {"rows": rows, "summary": summary, "labels": [label for label, _ in vectors]}


def markdown(payload: dict) -> str:
    """The results page, generated from the measured values."""
    s = payload["setup"]
    lines = [
        "# FID at infinite samples: how close to a many-sample FID",
        "",
        (
            f"MNIST DDPM, last 12 checkpoints, DDIM 10 steps; vectors {payload['labels']}; each scored at "
            f"{s['counts']} samples (batches of {s['batch_size']}: FID of the whole, halves and quarters, "
            f"FID_N = FID_inf + c/N fitted) on seeds {s['seeds']}, against one {s['reference_samples']}-sample "
            f"FID on seed {s['reference_seed']}. Commit {payload['machine'].get('git_commit')}; load average "
            f"{payload['machine']['load_average']} at the start; {payload['wall_s']:.0f} s."
        ),
        "",
        (
            "| N | raw FID_N - reference [95% CI] | FID_inf - reference [95% CI] | mean abs error raw / inf | "
            "sd over seeds raw / inf | rank corr. raw / inf |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for t in payload["summary"]:
        lines.append(
            f"| {t['n']} | {setup.fmt_paired(t['raw_minus_reference'])} | "
            f"{setup.fmt_paired(t['inf_minus_reference'])} | {t['abs_error_raw_mean']:.2f} / "
            f"{t['abs_error_inf_mean']:.2f} | {t['raw_sd_over_seeds_mean']:.2f} / {t['inf_sd_over_seeds_mean']:.2f} | "
            f"{t['spearman_raw_vs_reference']:.2f} / {t['spearman_inf_vs_reference']:.2f} |"
        )
    lines += ["", "## Reading", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def setup_note() -> str:
    """Which DDPM run the checkpoints come from (its training steps, from its summary.json)."""
    import json

    summary = setup.DDPM_DIR / "summary.json"
    steps = json.loads(summary.read_text()).get("steps") if summary.exists() else None
    return f"Checkpoints: {setup.display_path(setup.DDPM_DIR)}, a DDPM run of {steps} training steps."


def notes(summary: list[dict]) -> list[str]:
    """Observations computed from the summary (intervals over (vector, seed) pairs)."""
    out = []
    for t in summary:
        raw, inf = t["raw_minus_reference"], t["inf_minus_reference"]
        closer = "closer" if t["abs_error_inf_mean"] < t["abs_error_raw_mean"] else "not closer"
        out.append(
            f"N = {t['n']}: FID_inf is {closer} to the reference than raw FID_N (mean abs error "
            f"{t['abs_error_inf_mean']:.2f} vs {t['abs_error_raw_mean']:.2f}; bias {inf['mean']:+.2f} "
            f"[{inf['low']:+.2f}, {inf['high']:+.2f}] vs {raw['mean']:+.2f} [{raw['low']:+.2f}, {raw['high']:+.2f}]), "
            f"at a seed-to-seed sd of {t['inf_sd_over_seeds_mean']:.2f} vs {t['raw_sd_over_seeds_mean']:.2f}."
        )
    out.append(setup_note())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="counts 64/128, 2 seeds, reference 512")
    parser.add_argument("--counts", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--reference-samples", type=int, default=5000)
    parser.add_argument("--reference-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vectors", nargs="+", default=["last", "ema@0.8", "ema@0.95", "uniform"])
    args = parser.parse_args()
    if args.quick:
        args.counts, args.seeds, args.reference_samples, args.batch_size = [64, 128], [1, 2], 512, 16
    setup.ensure_trained()
    started = time.monotonic()
    with setup.LocalRay() as local_ray:
        local_ray.ensure()
        machine = setup.machine_info()
        measured = measure(args)
    payload = {
        "benchmark": "fid_extrapolation",
        "quick": args.quick,
        "machine": machine,
        "load_average_end": list(os.getloadavg()),
        "wall_s": time.monotonic() - started,
        "setup": {
            "counts": args.counts,
            "seeds": args.seeds,
            "reference_samples": args.reference_samples,
            "reference_seed": args.reference_seed,
            "batch_size": args.batch_size,
        },
        **measured,
        "notes": notes(measured["summary"]),
    }
    text = markdown(payload)
    path = setup.write_result("fid_extrapolation", payload, args.quick, text)
    print(text, flush=True)
    print(f"wrote {setup.display_path(path)} and .md", flush=True)


if __name__ == "__main__":
    main()
