"""End-to-end: run_training writes its result, and a run survives a node removed from a multi-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.chaos_train import step_accounting
from checkfree_ray import run_training
from checkfree_ray.cli import main
from rayops import storage
from schemas.train import TrainSpec
from schemas.train_result import TrainResult


@pytest.mark.timeout(240)
def test_run_training_writes_result_plot_and_metrics(ray_local, tmp_path):
    """A checkfree+ run with one kill: result.json lists the failure, validation points, plot and parquet."""
    spec = TrainSpec.model_validate(
        {
            "steps": 4,
            "eval_every": 2,
            "eval_batches": 2,
            "model": {"d_model": 32, "n_layers": 4, "n_heads": 2, "seq_len": 16},
            "pipeline": {
                "num_stages": 4,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "recovery": {"strategy": "checkfree+"},
            "failures": {"schedule": [[2, 3]]},
            "output": {"uri": str(tmp_path / "run")},
        }
    )
    result = run_training(spec, progress=False)
    assert result.steps == [1, 2, 3, 4] and len(result.losses) == 4
    assert [(f.step, f.stage, f.method) for f in result.failures] == [(2, 3, "copy")]
    assert result.val_steps == [2, 4] and result.final_perplexity == pytest.approx(
        2.718281828 ** result.val_losses[-1]
    )
    stored = TrainResult.model_validate_json(storage.read_bytes(str(tmp_path / "run" / "result.json")))
    assert stored.failures == result.failures
    assert (tmp_path / "run" / "loss_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "MANIFEST.json").exists() and (tmp_path / "run" / "metrics.parquet").exists()
    # a killed stage on a cluster whose nodes did not change: no cluster timeline
    assert result.cluster_timeline is None and not (tmp_path / "run" / "cluster_timeline.png").exists()


def test_cli_train_reports_bad_spec(tmp_path):
    """`checkfree-ray train` on an invalid spec exits 2 naming the field."""
    path = tmp_path / "bad.yaml"
    path.write_text("kind: train\nmodel: {n_layers: 5}\npipeline: {num_stages: 4}\n")
    outcome = CliRunner().invoke(main, ["train", str(path)])
    assert outcome.exit_code == 2 and "n_layers" in outcome.output


# `extended`: a training run losing a worker node is, in `make test`, test_checkfree_spot_e2e.py (a reclaim on
# the autoscaling cluster, every step kept once, nothing leaked).
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(300)
def test_survives_node_removed_from_multi_node_cluster(tmp_path):
    """A worker node is removed mid-run (its stage processes die with it); all 6 steps still commit."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.node_loss_demo", str(tmp_path)],
        cwd=Path(__file__).parent.parent,
        check=False,
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    report = json.loads(line[len("RESULT ") :])
    assert report["steps"][-1] == 6 and sorted(set(report["steps"])) == [1, 2, 3, 4, 5, 6]
    # the chaos harness's step accounting (its node kind runs this demo): every step kept once, none lost
    accounting = step_accounting(report["steps"], report["rolled_back"], report["expected_steps"])
    assert accounting == {"kept_steps": 6, "lost_steps": [], "counted_twice": [], "extra_steps": []}, report
    lost = sorted(f["stage"] for f in report["failures"])
    assert report["removed"]["stage"] in lost and all(f["step"] == 3 for f in report["failures"])
    assert report["removed"]["node"] not in report["nodes_after"]
    assert (report["leaked_actors"], report["leaked_placement_groups"]) == (0, 0)  # nothing outlives the run
