"""Write a search's outputs as one artifact (manifest last) and render its summary table."""

from __future__ import annotations

import io
import json
import logging
import time
from importlib import metadata

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lcsc_ray import plots
from lcsc_ray.export import search_diffusers_folder
from rayops import artifacts, storage
from rayops.cluster_timeline import timeline_png
from schemas.errors import LcscCheckfreeError
from schemas.search import SearchResult, SearchSpec

log = logging.getLogger(__name__)
SAMPLES_PER_ROW = 8  # images per model in samples.png: a glance, a small fraction of one evaluation

RESULT_FILES = (
    "result.json",
    "trials.parquet",
    "combined.safetensors",
    "combined.json",
    "fid_vs_evaluations.png",
    "coefficients.png",
)
SAMPLES_FILE = "samples.png"  # listed in result.files only when it was drawn (see `samples_png`)
TIMELINE_FILE = "cluster_timeline.png"  # only when the cluster's nodes changed during the search


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result."""
    out = {}
    for name in ("lcsc-checkfree-ray", "ray", "nevergrad", "torch", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def trials_table(trials: pd.DataFrame) -> bytes:
    """trials.parquet: one row per evaluation (coefficients as a list column); `fid` is the score the search
    ranked by (raw or FID_inf, `search.fidelity_score`), `fid_raw` the measured FID, `samples_spent` the samples
    drawn for the candidate so far, and the rung columns each rung's count and FIDs (asynchronous rungs)."""
    columns = [
        "trial_id",
        "phase",
        "rung",
        "label",
        "fid",
        "num_samples",
        "seed",
        "duration_s",
        "eval_s",
        "status",
        "reason",
        "alphas",
        "fid_raw",
        "fid_inf",
        "samples_spent",
        "rung_samples",
        "rung_fids",
        "rung_fids_inf",
    ]
    frame = trials.reindex(columns=columns).rename(columns={"alphas": "coefficients"})
    frame["coefficients"] = [list(map(float, a)) for a in frame.coefficients]
    frame["samples_spent"] = frame.samples_spent.fillna(0).astype("int64")
    for column in (
        "rung_samples",
        "rung_fids",
        "rung_fids_inf",
    ):  # each rung's count, raw and extrapolated FID
        frame[column] = [
            None if not isinstance(v, list | tuple | np.ndarray) else list(v) for v in frame[column]
        ]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_search_outputs(
    spec: SearchSpec, result: SearchResult, trials: pd.DataFrame, combined: bytes
) -> None:
    """The combined checkpoint (`combined`: the .safetensors bytes of the winner, from
    `export.combined_safetensors`), its sidecar, trials, plots and result.json, with the manifest written last."""
    provenance = {
        "coefficients": result.best.coefficients,
        "checkpoints": result.checkpoint_names,
        "steps": result.checkpoint_steps,
        "fid": result.best.fid,
        "num_samples": result.best.num_samples,
        "parametrization": spec.search.parametrization,
        "spec": spec.model_dump(mode="json"),
        "versions": versions(),
    }
    out = spec.output.uri
    diffusers_files = search_diffusers_folder(
        spec, combined
    )  # {} unless the checkpoints are diffusers folders
    samples = samples_png(spec, result)
    extra = {**diffusers_files, **({SAMPLES_FILE: samples} if samples is not None else {})}
    if result.cluster_timeline is not None:
        extra[TIMELINE_FILE] = timeline_png(result.cluster_timeline, f"{spec.name}: cluster timeline")
    result.files = {name: storage.join(out, name) for name in (*RESULT_FILES, *extra)}
    result.versions = versions()
    files = {
        "combined.safetensors": combined,
        "combined.json": json.dumps(provenance, indent=2).encode(),
        "trials.parquet": trials_table(trials),
        "fid_vs_evaluations.png": plots.fid_vs_evaluations(trials, result),
        "coefficients.png": plots.coefficients_plot(result),
        "result.json": result.model_dump_json(indent=2).encode(),
        **extra,
    }
    # a finished result stays complete until its replacement is (a rerun with --force or --restart)
    artifacts.write_artifact(
        out, files, metadata={"kind": "lcsc-search", "name": spec.name}, keep_old_manifest=True
    )


def samples_png(spec: SearchSpec, result: SearchResult) -> bytes | None:
    """samples.png: `SAMPLES_PER_ROW` images of the winner, the last checkpoint, the run's EMA and the best
    baseline, all from the same noise (chunk 0 of the search seed), drawn in this process from the checkpoint
    files. None, with a warning that says why, when they cannot be drawn: a preview never costs the result."""
    from lcsc_ray.candidate_samples import grid_candidates, preview_images

    started = time.perf_counter()
    try:
        candidates = grid_candidates(result)
        images = preview_images(spec, candidates, SAMPLES_PER_ROW, spec.fid.seed)
    except (LcscCheckfreeError, RuntimeError, ValueError, OSError) as exc:
        log.warning(
            "samples.png is left out: its samples could not be drawn (%s: %s)", type(exc).__name__, exc
        )
        return None
    names = ["LCSC winner" if c.label == "lcsc" else c.label for c in candidates]
    rows = [(f"{name}, FID {c.score.fid:.2f}", im) for name, c, im in zip(names, candidates, images)]
    png = plots.samples_grid(rows)
    log.info(
        "drew samples.png (%d rows of %d) in %.1f s",
        len(rows),
        SAMPLES_PER_ROW,
        time.perf_counter() - started,
    )
    return png


def format_table(result: SearchResult) -> str:
    """The summary table: every reported model at the same sample count and seeds, and for each baseline the
    mean paired difference LCSC - baseline over the held-out seeds with its 95% interval and verdict."""
    holdout_n = len(result.best.holdout_fids)
    header = (
        f"{'model':<24}{'FID':>10}{'held-out FID (mean ± sd of ' + str(holdout_n) + ')':>36}"
        f"{'LCSC - model [95% CI]':>30}  verdict"
    )
    title = (
        f"LCSC search '{result.spec.name}': {len(result.checkpoint_names)} checkpoints, "
        f"{result.num_evaluations} evaluations ({result.num_failed} failed), "
        # a result stored before samples were counted has none on record: say nothing rather than 0
        + (f"{result.search_samples:,} samples spent on them, " if result.search_samples else "")
        + f"{result.best.num_samples} samples per score, {result.wall_time_s:.0f} s"
    )
    lines = [title, header, "-" * len(header)]
    comparisons = {c.baseline: c for c in result.comparisons}
    for row in [result.best, *result.baselines]:
        hold = np.asarray(row.holdout_fids, dtype=float)
        spread = f"{hold.mean():.2f} ± {hold.std(ddof=1) if len(hold) > 1 else 0.0:.2f}" if len(hold) else "-"
        paired, verdict = "", ""
        if row.label in comparisons:
            c = comparisons[row.label]
            interval = f"[{c.low:+.2f}, {c.high:+.2f}]" if c.low is not None else "[no interval]"
            paired, verdict = f"{c.mean_difference:+.2f} {interval}", c.verdict
        elif (
            row is not result.best
        ):  # left out by `search.compare_with_baselines`: an inf has no paired verdict
            verdict = "not compared: a non-finite held-out FID"
        lines.append(f"{row.label:<24}{row.fid:>10.2f}{spread:>36}{paired:>30}  {verdict}".rstrip())
    if result.posthoc_ema:
        grid = ", ".join(f"{e.sigma_rel:g}: {e.fid:.2f}" for e in result.posthoc_ema)
        lines.append(
            f"post-hoc EMA (EDM2) at step {result.posthoc_ema[0].step}, FID on the search seed by sigma_rel: "
            f"{grid}"
        )
    if result.gain_found:
        lines.append("LCSC beat every baseline on held-out seeds (each paired 95% interval below 0)")
    else:
        lines.append(
            "no gain found: the search did not beat every baseline beyond the seed noise on held-out "
            "seeds (a paired 95% interval that includes 0 is a tie)"
        )
    return "\n".join(lines)


def load_result(output_uri: str) -> SearchResult:
    """Read a finished search's result.json (verified against its manifest)."""
    data = artifacts.read_artifact_file(output_uri, "result.json")
    return SearchResult.model_validate_json(data)
