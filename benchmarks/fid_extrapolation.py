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

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import lcsc_setup as setup


class Scores:
    """One evaluator pool (with its evaluation store) for every row; the reference FIDs are scored once."""

    def __init__(self, args, out: Path):
        from lcsc_ray import coefficients as coef
        from lcsc_ray.checkpoints import load_checkpoint_set
        from lcsc_ray.evaluation_store import EvaluationStore
        from lcsc_ray.fid import reference_stats_for
        from lcsc_ray.pool import EvaluatorPool
        from schemas.search import SearchSpec

        spec_dict = setup.make_spec(str(out), num_samples=min(args.counts))
        spec_dict["evaluators"]["batch_size"] = args.batch_size
        spec = SearchSpec.model_validate(spec_dict)
        checkpoint_set = load_checkpoint_set(spec.checkpoints)
        out.mkdir(parents=True, exist_ok=True)
        self.vectors = [v for v in coef.seed_vectors(len(checkpoint_set), spec) if v[0] in args.vectors]
        store = EvaluationStore(str(out / "state" / "evaluations"), identity=f"bench-b{args.batch_size}")
        self.pool = EvaluatorPool(spec, checkpoint_set, reference_stats_for(spec), store)
        self.args = args
        self.reference: dict[str, float] | None = None

    def close(self) -> None:
        self.pool.close()

    def measure(self, _name: str, n: int, seed: int) -> dict:
        """Every vector at N samples on `seed`, continued (seed-major order: a larger N continues the smaller
        one's blocks), beside its reference FID."""
        from lcsc_ray.pool import Job
        from rayops.progress import ProgressLine

        if self.reference is None:
            jobs = [Job.of(a, self.args.reference_samples, self.args.reference_seed) for _, a in self.vectors]
            records = self.pool.score(jobs, ProgressLine("reference FIDs", total=len(jobs)))
            self.reference = {label: r["fid"] for (label, _), r in zip(self.vectors, records)}
        jobs = [Job.of(a, n, seed, continued=True) for _, a in self.vectors]
        records = self.pool.score(jobs, ProgressLine(f"{n}-sample scores, seed {seed}", total=len(jobs)))
        return {
            "n": n,
            "vectors": {
                label: {
                    "fid_raw": r["fid"],
                    "fid_inf": r["fid_inf"],
                    "fit_points": r["fit_points"],
                    "reference_fid": self.reference[label],
                }
                for (label, _), r in zip(self.vectors, records)
            },
        }


def per_vector(rows: list[dict]) -> list[dict]:
    """The harness rows, one per (N, seed), as one row per (vector, N, seed) (the JSON's `scores`)."""
    return [
        {"label": label, "n": row["n"], "seed": row["seed"], **scores}
        for row in rows
        for label, scores in row["vectors"].items()
    ]


def summarize(rows: list[dict], counts: list[int]) -> list[dict]:
    """Per N: the raw and extrapolated FIDs' error against the reference (paired over (vector, seed) pairs),
    their spread over seeds, and the rank correlation with the reference over vectors."""
    from scipy.stats import spearmanr

    summary = []
    for n in sorted(counts):
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
    return summary


def setup_line(study: dict, labels: list[str]) -> str:
    """What is measured, in one paragraph."""
    return (
        f"MNIST DDPM, last 12 checkpoints, DDIM 10 steps; vectors {labels}; each scored at {study['counts']} "
        f"samples (batches of {study['batch_size']}: FID of the whole, halves and quarters, FID_N = FID_inf + c/N "
        f"fitted) on seeds {study['seeds']}, against one {study['reference_samples']}-sample FID on seed "
        f"{study['reference_seed']}."
    )


def table_markdown(summary: list[dict]) -> str:
    """Per N, the errors against the reference, generated from the measured values."""
    lines = [
        (
            "| N | raw FID_N - reference [95% CI] | FID_inf - reference [95% CI] | mean abs error raw / inf | "
            "sd over seeds raw / inf | rank corr. raw / inf |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for t in summary:
        lines.append(
            f"| {t['n']} | {setup.fmt_paired(t['raw_minus_reference'])} | "
            f"{setup.fmt_paired(t['inf_minus_reference'])} | {t['abs_error_raw_mean']:.2f} / "
            f"{t['abs_error_inf_mean']:.2f} | {t['raw_sd_over_seeds_mean']:.2f} / {t['inf_sd_over_seeds_mean']:.2f} | "
            f"{t['spearman_raw_vs_reference']:.2f} / {t['spearman_inf_vs_reference']:.2f} |"
        )
    return "\n".join(lines)


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
    cli = harness.parser(__doc__, seeds=[1, 2, 3], quick_seeds=[1, 2])
    cli.add_argument("--counts", type=int, nargs="+", default=None, help="default 128 256 512 (quick 64 128)")
    cli.add_argument("--reference-samples", type=int, default=None, help="default 5000 (quick 512)")
    cli.add_argument("--reference-seed", type=int, default=0)
    cli.add_argument("--batch-size", type=int, default=None, help="default 32 (quick 16)")
    cli.add_argument("--vectors", nargs="+", default=["last", "ema@0.8", "ema@0.95", "uniform"])
    args = cli.parse_args()
    args.counts = args.counts or ([64, 128] if args.quick else [128, 256, 512])
    args.reference_samples = args.reference_samples or (512 if args.quick else 5000)
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    setup.ensure_trained()
    with setup.LocalRay() as local_ray:
        local_ray.ensure()
        record = setup.record(args)
        scores = Scores(
            args, setup.BENCH_OUT / ("fid-extrapolation-quick" if args.quick else "fid-extrapolation")
        )
        try:
            sweep = harness.Sweep(
                "fid_extrapolation",
                configs={f"N={n}": n for n in sorted(args.counts)},
                seeds=harness.chosen_seeds(args),
                measure=scores.measure,
            )
            # every score is kept in the pool's evaluation store: rows measured again are replayed from it
            rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)
        finally:
            scores.close()
    labels = [label for label, _ in scores.vectors]
    study = {
        "counts": args.counts,
        "seeds": list(sweep.seeds),
        "reference_samples": args.reference_samples,
        "reference_seed": args.reference_seed,
        "batch_size": args.batch_size,
    }
    flat = per_vector(rows)
    summary = summarize(flat, args.counts)
    sweep = dataclasses.replace(sweep, describe=setup_line(study, labels))
    sweep.extra.update(setup=study, labels=labels, scores=flat, summary=summary)
    harness.finish(
        sweep,
        args,
        record,
        rows,
        notes=notes(summary),
        title="FID at infinite samples: how close to a many-sample FID",
        sections=[("Error against the reference", table_markdown(summary))],
    )


if __name__ == "__main__":
    main()
