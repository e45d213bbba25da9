"""A search runs through the pool and its evaluators in `sharded` and `stream` placement alike, and says so."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lcsc_ray.search import run_search
from tests.test_lcsc_search import tiny_spec


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_search_in_sharded_and_stream_placement_matches_node(ray_local, tmp_path):
    """The same 4-evaluation search (with the run's EMA as a baseline) under node, sharded and stream scores
    every candidate the same, and result.json names the placement."""
    fids = {}
    for mode in ("node", "sharded", "stream"):
        spec = tiny_spec(tmp_path, budget=4)
        checkpoints = spec.checkpoints.model_copy(
            update={"placement": mode, "ema_uri": str(tmp_path / "ckpts" / "ckpt-000500.safetensors")}
        )
        output = spec.output.model_copy(update={"uri": str(tmp_path / f"out-{mode}")})
        run_search(spec.model_copy(update={"checkpoints": checkpoints, "output": output}))
        result = json.loads((tmp_path / f"out-{mode}" / "result.json").read_text())
        assert result["placement"]["mode"] == mode and result["num_evaluations"] == 4
        trials = pd.read_parquet(tmp_path / f"out-{mode}" / "trials.parquet")
        assert (trials.status == "ok").all()
        fids[mode] = sorted(trials.fid) + [b["fid"] for b in result["baselines"]]
    assert fids["sharded"] == fids["node"] == fids["stream"]
