"""What the LCSC studies share: the MNIST runs they search, spec building, one cached search (a study's
`measure`: `study_search`), its summary row, paired verdicts, a local Ray and the run record; each study is a
config grid over one harness sweep (`harness.py` writes the results).

Paths come from `_common.ROOT`; nothing here changes the working directory. Importing this module is cheap
(no torch, no Ray): each benchmark imports what it needs when it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Self

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

ROOT = _common.ROOT
BENCH_OUT = ROOT / "outputs" / "bench"
# The recipes' default runs (DDPM 2,500 steps, then the CM distilled from it), in the benchmarks' own folder: the
# demo's outputs/mnist-ddpm is a shorter run whose 25 checkpoints would otherwise pass for a finished default one.
DDPM_DIR = BENCH_OUT / "mnist-ddpm"
CM_DIR = BENCH_OUT / "mnist-cm"
HOLDOUT_SEEDS = [1001, 1002, 1003]
RAYLET_START_WAIT_S = 300


# --------------------------------------------------------------------------------------------- the runs
def run_complete(directory: Path, min_checkpoints: int = 25) -> bool:
    """True when a recipe run in `directory` saved its EMA and at least `min_checkpoints` checkpoints."""
    return (directory / "ema.safetensors").exists() and len(
        list((directory / "checkpoints").glob("ckpt_*"))
    ) >= min_checkpoints


def ensure_trained(cm: bool = False) -> None:
    """Train the MNIST DDPM (and distil the consistency model) with the recipes' defaults when missing; the
    recipes resume an interrupted run and leave a finished one alone."""
    from lcsc_ray.recipes.train import train_consistency, train_ddpm

    if not run_complete(DDPM_DIR):
        print(f"training the MNIST DDPM ({DDPM_DIR} incomplete) ...", flush=True)
        train_ddpm({"out": str(DDPM_DIR)})
    if cm and not run_complete(CM_DIR):
        print(f"distilling the MNIST consistency model ({CM_DIR} incomplete) ...", flush=True)
        train_consistency({"out": str(CM_DIR), "teacher_uri": str(DDPM_DIR / "ema.safetensors")})


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Training steps of the run's saved checkpoints (`ckpt_NNNNNN.safetensors`), ascending."""
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("ckpt_*.safetensors"))


def early_checkpoint_paths(steps: list[int], fraction: float) -> list[str]:
    """File names of the checkpoints saved within the first `fraction` of training (by step)."""
    if not steps:
        raise ValueError("no checkpoints: the run directory has no ckpt_*.safetensors (train it first)")
    cutoff = fraction * max(steps)
    return [f"ckpt_{step:06d}.safetensors" for step in steps if step <= cutoff]


def make_spec(
    out: str,
    *,
    run_dir: Path | None = None,
    last: int | None = 12,
    paths: list[str] | None = None,
    cm: bool = False,
    nfe: int = 10,
    num_samples: int = 500,
    holdout_seeds: list[int] | None = None,
    holdout_num_samples: int | None = None,
    seed: int = 0,
    **search,
) -> dict:
    """A SearchSpec dict for the MNIST recipes (`run_dir` defaults to the consistency model's run when `cm`,
    else the DDPM's); `search` overrides SearchAlgoSpec fields."""
    run_dir = run_dir or (CM_DIR if cm else DDPM_DIR)
    model = "lcsc_ray.recipes.mnist:build_consistency_model" if cm else "lcsc_ray.recipes.mnist:build_unet"
    sampler = "lcsc_ray.recipes.mnist:consistency_sample" if cm else "lcsc_ray.recipes.mnist:ddim_sample"
    checkpoints = {
        "uri": str(run_dir / "checkpoints"),
        "glob": "ckpt_*.safetensors",
        "ema_uri": str(run_dir / "ema.safetensors"),
    }
    if paths is not None:
        checkpoints["paths"] = paths
    else:
        checkpoints["last"] = last
    return {
        "kind": "search",
        "name": Path(out).name,
        "seed": seed,
        "checkpoints": checkpoints,
        "model": {"target": model},
        "sampler": {"target": sampler, "nfe": nfe},
        "fid": {
            "num_samples": num_samples,
            "seed": 0,
            "holdout_seeds": HOLDOUT_SEEDS if holdout_seeds is None else holdout_seeds,
            "holdout_num_samples": holdout_num_samples,
        },
        "evaluators": {"num_actors": 2, "num_cpus": 1.0, "torch_threads": 1},
        "search": search,
        "output": {"uri": out},
    }


# ----------------------------------------------------------------------------------- cached searches
def setting_key(spec: dict) -> str:
    """What an FID depends on besides (coefficients, samples, noise seed): checkpoints, model, sampler, NFE."""
    from lcsc_ray.run_identity import plugin_revision

    keyed = {k: spec[k] for k in ("checkpoints", "model", "sampler")}
    keyed["features"] = spec["fid"].get("features")
    batch = spec.get("evaluators", {}).get("batch_size")
    if batch is not None:  # chunk j's noise depends on the batch size: records of other batch sizes differ
        keyed["batch_size"] = batch
    revision = plugin_revision(spec["sampler"]["target"])  # a sampler that now gives other images: new key
    if revision is not None:
        keyed["sampler_revision"] = revision
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def copy_records(source: Path, target: Path) -> int:
    """Copy evaluation records (one JSON file each) that `target` lacks; returns how many."""
    if not source.exists():
        return 0
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for file in source.glob("*.json"):
        if not (target / file.name).exists():
            shutil.copy(file, target / file.name)
            copied += 1
    return copied


def set_aside_stale(out: Path, sampler_target: str, verbose: bool = True) -> None:
    """A search in `out` made with another revision of its sampler (the recipe's DDIM before diffusers) is
    renamed to `out.revision-OLD`: kept as it was, never loaded as this revision's result nor resumed."""
    from lcsc_ray.run_identity import plugin_revision

    fingerprint = out / "state" / "fingerprint.json"
    if not fingerprint.exists():
        return
    stored = json.loads(fingerprint.read_text()).get("sampler", {}).get("revision")
    current = plugin_revision(sampler_target)
    if stored == current:
        return
    aside = out.with_name(f"{out.name}.revision-{stored or 'none'}")
    copy = 1
    while aside.exists():
        copy += 1
        aside = out.with_name(f"{out.name}.revision-{stored or 'none'}-{copy}")
    out.rename(aside)
    if verbose:
        print(
            f"--- {display_path(out)} was made with sampler revision {stored!r}, not {current!r}: set aside to "
            f"{display_path(aside)}",
            flush=True,
        )


def run_cached_search(spec_dict: dict, ray_handle: LocalRay | None = None, verbose: bool = True) -> dict:
    """Run one search (or load it when its result already exists; resume it when it was interrupted) and
    return its summary row.

    FIDs are deterministic given (coefficients, samples, seed) within one setting, so the evaluation records
    of earlier searches of the same setting are copied into this one's record first: the search then replays,
    instead of re-running, what it shares with them (the seed vectors' trials, the baselines' held-out
    scores). The optimiser's own candidates are new and always evaluated."""
    from lcsc_ray.search import run_search
    from schemas.search import SearchSpec

    out = Path(spec_dict["output"]["uri"])
    cache = BENCH_OUT / "cache" / setting_key(spec_dict) / "evaluations"
    records = out / "state" / "evaluations"
    ref_cache = BENCH_OUT / "cache" / "reference_stats"
    set_aside_stale(out, spec_dict["sampler"]["target"], verbose)
    if not (out / "result.json").exists():
        reused = copy_records(cache, records)
        if ref_cache.exists():
            shutil.copytree(ref_cache, out / "reference_stats", dirs_exist_ok=True)
        if verbose:
            print(f"--- search {display_path(out)} ({reused} evaluations reused)", flush=True)
        (ray_handle or LocalRay()).ensure()
        started = time.monotonic()
        run_search(SearchSpec.model_validate(spec_dict))
        (out / "bench_wall_s.txt").write_text(f"{time.monotonic() - started:.3f}\n")
        copy_records(records, cache)
        if (out / "reference_stats").exists():
            shutil.copytree(out / "reference_stats", ref_cache, dirs_exist_ok=True)
    return load_summary(out)


def load_summary(out: Path) -> dict:
    """The summary row of the finished search in `out` (its result.json and trials.parquet)."""
    import pandas as pd

    from schemas.search import SearchResult

    result = SearchResult.model_validate_json((out / "result.json").read_text())
    trials = pd.read_parquet(out / "trials.parquet")
    wall_file = out / "bench_wall_s.txt"
    wall = float(wall_file.read_text()) if wall_file.exists() else result.wall_time_s
    return summarize(result, trials, wall)


def holdout_mean(score) -> float:
    """Mean held-out FID of a CandidateScore (its search-seed FID when it has no held-out scores)."""
    return float(np.mean(score.holdout_fids)) if score.holdout_fids else float(score.fid)


def display_path(path: Path | str) -> str:
    """`path` relative to the repository when it lies inside it, else as given."""
    path = Path(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def summarize(result, trials, wall: float) -> dict:
    """One row: the winner's and each baseline's held-out FIDs (per seed and mean), the paired comparisons the
    search made, and the search's cost."""
    baselines = {b.label: holdout_mean(b) for b in result.baselines}
    sparse = [label for label in baselines if label.startswith("best-sparse")]
    ok = trials[(trials.status == "ok") & (trials.rung == 0)]
    # samples the search generated for its candidates (screening + rungs), independent of cached re-uses
    search_samples = int(trials[trials.status != "failed"].num_samples.fillna(0).sum())
    seed_trials = ok[ok.phase == "seeds"]
    return {
        "name": result.spec.name,
        "optimizer": result.spec.search.optimizer,
        "bound": result.spec.search.bound,
        "sigma": result.spec.search.sigma,
        "seed": result.spec.seed,
        "budget": result.spec.search.budget,
        "nfe": result.spec.sampler.nfe,
        "checkpoints": list(result.checkpoint_names),
        "fidelity_schedule": result.spec.search.fidelity_schedule,
        "search_num_samples": result.spec.fid.num_samples,
        "holdout_seeds": list(result.spec.fid.holdout_seeds),
        "final_num_samples": result.best.num_samples,
        "holdout_num_samples": result.spec.fid.holdout_num_samples or result.spec.fid.num_samples,
        "winner_search_fid": float(result.best.fid),
        "winner_holdout_fids": [float(f) for f in result.best.holdout_fids],
        "winner_holdout_fid": holdout_mean(result.best),
        "winner_coefficients": [round(float(a), 4) for a in result.best.coefficients],
        "best_seed_trial_fid": float(seed_trials.fid.min()) if len(seed_trials) else float("nan"),
        "best_trial_fid": float(ok.fid.min()) if len(ok) else float("nan"),
        "best_trial_phase": str(ok.loc[ok.fid.idxmin(), "label"]) if len(ok) else "",
        "gain_found": bool(result.gain_found),
        "baselines_holdout_fid": baselines,
        "baselines_holdout_fids": {b.label: [float(f) for f in b.holdout_fids] for b in result.baselines},
        "comparisons": {c.baseline: c.model_dump() for c in result.comparisons},
        "best_sparse_ema_label": sparse[0] if sparse else None,
        "num_evaluations": result.num_evaluations,
        "num_failed": result.num_failed,
        "total_samples": result.total_samples,
        "search_samples": search_samples,
        "wall_s": round(wall, 1),
        "result_wall_time_s": round(result.wall_time_s, 1),
        "output": display_path(result.spec.output.uri),
    }


# ------------------------------------------------------------------------------------------- statistics
def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd 0 for one value, NaN for none)."""
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(statistics.stdev(values)) if len(values) > 1 else 0.0)


def paired(a: list[float], b: list[float]) -> dict:
    """Paired difference FID(a) - FID(b) over shared seeds: mean, 95% interval and verdict (`rayops.paired`:
    'win' when the interval lies below 0, a is better; 'loss' above 0; 'tie', or 'tie (no interval)' with one seed)."""
    from rayops.paired import paired_difference

    d = paired_difference(a, b)
    verdict = d.verdict("lower") if d.has_interval else "tie (no interval)"
    return {
        "mean": d.mean,
        "low": d.low,
        "high": d.high,
        "num_seeds": d.num_seeds,
        "verdict": verdict,
    }


def fmt_paired(p: dict) -> str:
    """'-3.1 [-5.0, -1.2] win' for a table cell."""
    if p["num_seeds"] < 2:
        return f"{p['mean']:+.2f} (1 seed)"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] {p['verdict']}"


def seeds_needed(p: dict, margin: float = 1.0) -> int | None:
    """Seeds an interval like `p` (a `paired` dict) would need to be narrower than ±`margin` at the spread it
    measured (`rayops.paired.seeds_to_resolve`); None without an interval."""
    from rayops.paired import PairedDifference, seeds_to_resolve

    return seeds_to_resolve(PairedDifference(p["mean"], p["low"], p["high"], p["num_seeds"]), margin)


# --------------------------------------------------------------------------------------------------- Ray
class LocalRay:
    """The benchmarks' local Ray (`_common.local_ray`, through `rayops.session`), started on first `ensure()`
    (so a benchmark whose searches are all finished only reads their results) and stopped when the context
    exits."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self._stack = contextlib.ExitStack()

    def ensure(self) -> None:
        """Start (or reuse) Ray; retried a few times, since a local start can time out on crowded cores."""
        import ray

        if ray.is_initialized():
            return
        # niced searches beside a load average of 50-100 on 2 cores: the raylet took longer than 120 s to register;
        # `rayops.session` starts a local Ray that timed out again (LOCAL_START_ATTEMPTS)
        os.environ.setdefault(_common.RAYLET_START_WAIT, str(RAYLET_START_WAIT_S))
        self._stack.enter_context(_common.local_ray(self.num_cpus))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False


# ------------------------------------------------------------------------------------------------ studies
def record(args) -> dict:
    """The harness's run record, the machine with the evaluator layout and the commit (`machine.git_commit`,
    which the studies' notes cite)."""
    import harness

    return harness.run_record(
        args, torch_threads_per_evaluator=1, evaluator_actors=2, git_commit=_common.git_commit()
    )


def study_dir(study: str, tag: str, name: str, seed: int) -> Path:
    """Where a study's search of (config, seed) is kept: outputs/bench/<study>-<tag>/<config>-seed<seed>."""
    return BENCH_OUT / f"{study}-{tag}" / f"{slug(name)}-seed{seed}"


def study_search(
    study: str,
    tag: str,
    name: str,
    seed: int,
    local_ray: LocalRay,
    batch_size: int | None = None,
    **spec_args,
) -> tuple[dict, Path]:
    """One (config, seed) of an LCSC study: its search in outputs/bench/<study>-<tag>/<config>-seed<seed>, run
    or loaded (`run_cached_search`); returns its summary row (with `config`) and its folder. `spec_args` go to
    `make_spec` (SearchAlgoSpec overrides among them)."""
    out = study_dir(study, tag, name, seed)
    spec = make_spec(str(out), seed=seed, **spec_args)
    if batch_size:
        spec["evaluators"]["batch_size"] = batch_size
    return run_cached_search(spec, local_ray) | {"config": name}, out


def baselines_of(rows: list[dict]) -> dict:
    """The baselines' held-out FIDs of the first row (every search of a study scores the same baselines)."""
    return rows[0]["baselines_holdout_fid"] if rows else {}


def slug(name: str) -> str:
    """A configuration name as a folder name ('SH 250->1000 keep 0.25' -> 'SH_250-1000_keep_025')."""
    return name.replace(" ", "_").replace("->", "-").replace(".", "")
