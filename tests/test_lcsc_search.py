"""The LCSC search end to end on tiny plug-ins: budget, outputs, baselines, retries, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lcsc_ray.cli import main
from lcsc_ray.coefficients import seed_vectors
from lcsc_ray.evaluation_store import evaluation_key
from lcsc_ray.report import format_table, load_result
from lcsc_ray.search import rescore_count, run_search
from rayops import artifacts
from schemas.search import SearchSpec
from tests.lcsc_plugins import write_run

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec(tmp_path: Path, budget: int = 10, sampler: dict | None = None, **search) -> SearchSpec:
    """A search over 5 tiny checkpoints with 64-sample FIDs."""
    if not (tmp_path / "ckpts").exists():
        write_run(tmp_path / "ckpts", num=5)
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": sampler or {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 64,
                "holdout_seeds": [11, 12],
            },
            "evaluators": {"num_actors": 2, "batch_size": 64, "num_cpus": 0.5},
            "search": {"budget": budget, "optimizer": "CMA", "ema_decays": [0.5, 0.8], **search},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def test_rescore_top_k_only_when_it_can_change_the_pick():
    """Re-scoring the top k helps only when the final sample count differs from the one that ranked them."""
    rows = pd.DataFrame({"num_samples": [64, 64, 64], "fid": [3.0, 1.0, 2.0]})
    same = SearchSpec.model_validate({"fid": {"num_samples": 64}, "search": {"rescore_top_k": 3}})
    more = SearchSpec.model_validate(
        {"fid": {"num_samples": 64, "holdout_num_samples": 256}, "search": {"rescore_top_k": 3}}
    )
    assert rescore_count(same, rows) == 1
    assert rescore_count(more, rows) == 3


def test_seed_vectors_are_distinct_and_capped():
    """Seeds are last, EMA-shaped and uniform, deduplicated, never more than the budget."""
    spec = SearchSpec.model_validate({"search": {"budget": 3, "ema_decays": [1e-9, 0.5, 0.9]}})
    seeds = seed_vectors(4, spec)
    assert [label for label, _ in seeds] == ["last", "ema@0.5", "ema@0.9"]  # ema@1e-9 equals last
    assert all(np.isclose(a.sum(), 1.0) for _, a in seeds)


@pytest.mark.timeout(300)
def test_small_search_end_to_end(ray_local, tmp_path):
    """A 10-evaluation search spends exactly its budget and writes a verified, consistent result."""
    spec = tiny_spec(tmp_path, budget=10)
    result = run_search(spec)
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials[trials.rung == 0]) == 10 == result.num_evaluations
    assert set(trials.phase) == {"seeds", "search"} and (trials.status == "ok").all()
    labels = {b.label for b in result.baselines}
    assert {"last", "uniform"} <= labels and any(label.startswith("best-sparse-ema@") for label in labels)
    # the winner is the best of the search at the reported sample count and seed
    assert result.best.fid <= min(trials[trials.status == "ok"].fid) + 1e-9
    assert all(len(b.holdout_fids) == 2 for b in [result.best, *result.baselines])
    # the exported checkpoint is sum_i alpha_i theta_i of the files, computed independently
    files = sorted((tmp_path / "ckpts").glob("*.safetensors"))
    alphas = result.best.coefficients
    combined = load_file(tmp_path / "out" / "combined.safetensors")
    for name, tensor in combined.items():
        if tensor.is_floating_point():
            expected = sum(a * load_file(f)[name].double() for a, f in zip(alphas, files))
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)
    # `lcsc-ray combine` with the result's coefficients writes the very same bytes (one combination path)
    cli = CliRunner().invoke(
        main,
        [
            "combine",
            "--coefficients",
            str(tmp_path / "out" / "result.json"),
            "--checkpoints",
            str(tmp_path / "ckpts"),
            "--out",
            str(tmp_path / "cli.safetensors"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "cli.safetensors").read_bytes() == (
        tmp_path / "out" / "combined.safetensors"
    ).read_bytes()
    assert artifacts.is_complete(str(tmp_path / "out"))
    assert load_result(str(tmp_path / "out")).best.coefficients == alphas
    assert "held-out" in format_table(result)
    # every recorded evaluation counted once: 64 samples each (search, final and held-out scores alike)
    assert result.total_samples == 64 * len(recorded_evaluations(tmp_path / "out"))
    # final n equals the search's n on the same seed: only the winner is re-scored on the held-out seeds
    held_out = [k for k in recorded_evaluations(tmp_path / "out") if k.endswith(("-s11", "-s12"))]
    assert len(held_out) <= 2 * (1 + len(result.baselines))


def recorded_evaluations(out: Path) -> dict[str, float]:
    """Evaluations the search has recorded as finished: key -> FID."""
    return {p.stem: json.loads(p.read_text())["fid"] for p in (out / "state" / "evaluations").glob("*.json")}


RUNNER = "import sys; from lcsc_ray.sdk import run_search; run_search(sys.argv[1])"


# `extended`: a driver SIGKILLed mid-search and run again is one of the seeded events of
# test_chaos_search.py::test_chaos_run_ends_as_its_uninterrupted_twin (`make test`), which checks the same.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
def test_search_resumes_after_sigkill_without_rerunning_trials(tmp_path):
    """A driver killed mid-search resumes: finished trials are kept, none re-run, the budget is exact."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    spec = tiny_spec(
        tmp_path,
        budget=16,
        sampler={
            "target": "tests.lcsc_search_plugins:counting_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(log_dir)},
        },
    )
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(spec_path)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "out"
    deadline = time.monotonic() + 240
    while len(recorded_evaluations(out)) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    finished_before = recorded_evaluations(out)
    calls_before = len((log_dir / "calls.log").read_text().splitlines())
    assert 8 <= len(finished_before) < 16 and not (out / "result.json").exists()

    rerun = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec_path)],
        cwd=ROOT,
        env=env,
        timeout=400,
        capture_output=True,
        text=True,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    search_rows = trials[trials.rung == 0]
    assert len(search_rows) == 16
    keys = {evaluation_key(a, 64, 0) for a in search_rows.coefficients}
    assert set(finished_before) <= keys  # every evaluation finished before the kill is in the result
    for key, fid in finished_before.items():
        assert recorded_evaluations(out)[key] == fid
    # the resumed result counts each evaluation once, whichever run computed it
    assert json.loads((out / "result.json").read_text())["total_samples"] == 64 * len(
        recorded_evaluations(out)
    )
    # each search evaluation is one sampler call: calls during the rerun cover only unfinished trials,
    # plus the final scores (5 reported models x 3 seeds at most)
    calls_total = len((log_dir / "calls.log").read_text().splitlines())
    search_calls_after = calls_total - calls_before
    assert search_calls_after <= (16 - len(finished_before)) + 5 * 3


@pytest.mark.timeout(300)
def test_trial_survives_evaluator_death(ray_local, tmp_path):
    """An evaluator process that dies mid-evaluation costs no trial: it is retried on another evaluator."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    spec = tiny_spec(
        tmp_path,
        budget=8,
        sampler={
            "target": "tests.lcsc_search_plugins:crashing_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(log_dir), "crash_on_call": 3},
        },
    )
    result = run_search(spec)
    assert (log_dir / "crashed").exists(), "the evaluator process was never killed"
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials[trials.rung == 0]) == 8
    assert result.num_failed == 0 and (trials.status == "ok").all()


def test_resuming_with_a_different_spec_is_refused(tmp_path):
    """A second search with another budget in the same output is a SpecError naming the changed field."""
    from lcsc_ray.search import check_resumable
    from schemas.errors import SpecError

    check_resumable(tiny_spec(tmp_path, budget=10))
    check_resumable(tiny_spec(tmp_path, budget=10))  # the same spec resumes
    with pytest.raises(SpecError, match=r"different spec \(changed: search\).*new `output.uri`"):
        check_resumable(tiny_spec(tmp_path, budget=12))
