"""A rung whose re-scores all failed (lost evaluations: FID inf) leaves the pick to the rung below, never to an inf."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd

from lcsc_ray.search import reported_candidates


def test_a_failed_top_rung_leaves_the_pick_to_the_best_scored_rung():
    """The only rung-1 row failed: top1 is the best rung-0 candidate (FID 8), not the failed re-score nor nothing."""
    best, other = [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]
    trials = pd.DataFrame(
        [
            {
                "phase": "seeds",
                "label": "last",
                "status": "ok",
                "fid": 10.0,
                "rung": 0,
                "alphas": [0.0, 0.0, 1.0],
            },
            {"phase": "search", "label": "search", "status": "ok", "fid": 8.0, "rung": 0, "alphas": best},
            {"phase": "search", "label": "search", "status": "ok", "fid": 9.0, "rung": 0, "alphas": other},
            {
                "phase": "rung1",
                "label": "search",
                "status": "failed",
                "fid": math.inf,
                "rung": 1,
                "alphas": best,
            },
        ]
    )
    spec = SimpleNamespace(
        search=SimpleNamespace(rescore_top_k=1, fidelity_schedule=[64, 256]),
        fid=SimpleNamespace(holdout_num_samples=None, num_samples=256),
    )
    run = SimpleNamespace(spec=spec, checkpoints=SimpleNamespace(ema_ref=None))
    candidates = reported_candidates(run, trials, [("last", np.array([0.0, 0.0, 1.0]))])
    assert candidates["top1"] == best and candidates["last"] == [0.0, 0.0, 1.0]
