"""Regression tests for two run_search fixes found while benchmarking the search on the MNIST recipe."""

from __future__ import annotations

import math
import shutil

import pytest

from lcsc_ray.search import run_search
from tests.test_lcsc_search import tiny_spec


@pytest.mark.timeout(280)
def test_run_ema_baseline_and_back_to_back_searches(ray_local, tmp_path):
    """With `checkpoints.ema_uri`, the evaluator actors start (the EMA ObjectRef reaches them resolved, as a
    top-level actor argument) and score the run's EMA; and a finished search releases its evaluators, so a
    second search whose actors need the same CPUs starts in the same Ray session."""
    first = tiny_spec(tmp_path, budget=6)
    shutil.copy(min((tmp_path / "ckpts").glob("*.safetensors")), tmp_path / "ema.safetensors")
    data = first.model_dump()
    data["checkpoints"]["ema_uri"] = str(tmp_path / "ema.safetensors")
    data["evaluators"]["num_cpus"] = 1.0  # two actors take both CPUs of the test Ray
    results = []
    for name in ("a", "b"):
        data["output"]["uri"] = str(tmp_path / name)
        results.append(run_search(type(first).model_validate(data)))
    for result in results:
        ema = [b for b in result.baselines if b.label == "run-ema"]
        assert len(ema) == 1 and len(ema[0].holdout_fids) == 2
        assert all(math.isfinite(f) for f in [ema[0].fid, *ema[0].holdout_fids])
    assert results[0].baselines[-1].holdout_fids == results[1].baselines[-1].holdout_fids
