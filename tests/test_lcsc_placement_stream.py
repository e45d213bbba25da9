"""`stream` placement end to end: a set larger than the whole object store is searched from its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rayops.local_head import ray_env
from schemas.loader import dump_spec
from schemas.search import SearchSpec
from tests.placement_plugins import write_wide_run

ROOT = Path(__file__).resolve().parents[1]
STORE = 100_000_000  # the local Ray's whole object store


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_searches_a_set_larger_than_the_object_store(tmp_path):
    """4 x 40 MB checkpoints (1.6x the object store) are placed `stream` by auto; the search spends its budget
    and its evaluators hold no checkpoint in the object store."""
    numel = 10_000_000
    write_wide_run(tmp_path / "ckpts", num=4, numel=numel)
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.placement_plugins:build_wide", "kwargs": {"numel": numel}},
            "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 64,
                "holdout_seeds": [11],
            },
            "evaluators": {"num_actors": 1, "batch_size": 64, "num_cpus": 0.5},
            "search": {"budget": 6, "optimizer": "CMA", "ema_decays": [0.5]},
            "ray": {"num_cpus": 2, "object_store_memory": STORE},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    path = tmp_path / "spec.yaml"
    dump_spec(spec, path)
    env = {**ray_env(), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "search", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "checkpoint placement stream: auto: too big for the cluster's object stores" in log
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials[trials.rung == 0]) == 6 and (trials.status == "ok").all()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["num_evaluations"] == 6 and result["placement"]["mode"] == "stream"
    assert "too big for the cluster's object stores" in result["placement"]["reason"]
