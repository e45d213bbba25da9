"""Jobs: `submit_search` on a local head with results on SeaweedFS, and the `lcsc-ray` job commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lcsc_ray.sdk import submit_search
from rayops import artifacts, storage
from tests.test_lcsc_search import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_search_to_local_head_with_results_on_s3(s3_bucket, tmp_path, monkeypatch):
    """A search submitted as a Ray job writes its whole result to the SeaweedFS bucket."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the tiny plug-ins live in tests/
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tiny_spec(tmp_path, budget=8)
    spec = spec.model_copy(
        update={"output": spec.output.model_copy(update={"uri": f"{s3_bucket}/runs/tiny"})}
    )
    with submit_search(spec) as job:
        assert job.wait(timeout_s=500) == "SUCCEEDED", job.logs()[-3000:]
        result = job.result()
        logs = job.logs()
    assert result.num_evaluations == 8
    assert "lcsc search: trials 8/8" in logs
    out = f"{s3_bucket}/runs/tiny"
    manifest = artifacts.read_manifest(out)
    assert {"result.json", "trials.parquet", "combined.safetensors", "fid_vs_evaluations.png"} <= set(
        manifest["files"]
    )
    local = tmp_path / "trials.parquet"
    local.write_bytes(artifacts.read_artifact_file(out, "trials.parquet", manifest))
    assert len(pd.read_parquet(local)) == 8
    assert storage.list_uris(f"{out}/tune", "*experiment_state*")  # Tune's own state sits on S3 too


def test_combine_and_report_commands(tmp_path):
    """`lcsc-ray combine` exports a weighted sum; `lcsc-ray report` on a missing output exits 1 naming it."""
    from tests.lcsc_plugins import write_run

    paths = write_run(tmp_path / "ckpts", num=3)
    coefficients = tmp_path / "c.json"
    coefficients.write_text(json.dumps([0.5, -0.25, 0.75]))
    out = tmp_path / "combined.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcsc_ray",
            "combine",
            "--coefficients",
            str(coefficients),
            "--checkpoints",
            str(tmp_path / "ckpts"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    combined, files = load_file(out), [load_file(p) for p in paths]
    name = "conv1.weight"
    expected = 0.5 * files[0][name] - 0.25 * files[1][name] + 0.75 * files[2][name]
    assert (combined[name] - expected).abs().max() < 1e-6
    assert json.loads(out.with_suffix(".json").read_text())["coefficients"] == [0.5, -0.25, 0.75]
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "lcsc_ray",
            "combine",
            "--coefficients",
            str(coefficients),
            "--checkpoints",
            str(tmp_path / "ckpts"),
            "--last",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert wrong.returncode == 1 and "3 coefficients for 2 checkpoints" in wrong.stderr
    report = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert report.returncode == 1 and "nothing" in report.stderr
