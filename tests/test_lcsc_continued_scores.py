"""A promoted candidate continues its stored chunk statistics instead of restarting, and its FID_inf fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lcsc_ray.checkpoints import load_checkpoint_set
from lcsc_ray.evaluation_store import EvaluationStore
from lcsc_ray.evaluator import Evaluator
from lcsc_ray.fid import FIDStats, reference_stats_for
from lcsc_ray.fid_extrapolation import block_bounds, fit_fid_inf, fit_points
from lcsc_ray.pool import EvaluatorPool, Job
from schemas.search import SearchSpec
from tests import lcsc_plugins

BATCH, SEED, ALPHAS = 16, 5, [0.2, -0.1, 0.9]


def counting_spec(tmp_path: Path) -> SearchSpec:
    """Three tiny checkpoints, two evaluators, a sampler that logs each call's sample count."""
    lcsc_plugins.write_run(tmp_path / "ckpts", num=3)
    (tmp_path / "log").mkdir()
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {
                "target": "tests.lcsc_search_plugins:counting_sample",
                "nfe": 2,
                "kwargs": {"log_dir": str(tmp_path / "log")},
            },
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 64,
            },
            "evaluators": {"num_actors": 2, "batch_size": BATCH, "num_cpus": 0.5},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def drawn(tmp_path: Path) -> int:
    """Samples the sampler drew so far (every call logs its count)."""
    log = tmp_path / "log" / "calls.log"
    return sum(int(line.split()[2]) for line in log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.timeout(300)
def test_promotion_draws_only_its_increment_and_equals_a_fresh_score(tmp_path, ray_local):
    """64 -> 256 samples draws 192 more (not 256), equals a fresh 256-sample score to float tolerance, and a
    pool started again over the same store (a resumed search) continues from the stored blocks too."""
    spec = counting_spec(tmp_path)
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    reference = reference_stats_for(spec)
    store = EvaluationStore(str(tmp_path / "out" / "state" / "evaluations"), identity="inputs")
    pool = EvaluatorPool(spec, checkpoint_set, reference, store)
    try:
        low = pool.score([Job.of(ALPHAS, 64, SEED, continued=True)])[0]
        after_low = drawn(tmp_path)
        high = pool.score([Job.of(ALPHAS, 256, SEED, continued=True)])[0]
        after_high = drawn(tmp_path)
    finally:
        pool.close()
    assert low["status"] == high["status"] == "ok"
    assert after_low == 64 and after_high - after_low == 192
    assert (low["samples_drawn"], high["samples_drawn"]) == (64, 192)
    fresh = Evaluator(spec, checkpoint_set, reference_mu=reference[0], reference_sigma=reference[1])
    assert high["fid"] == pytest.approx(fresh.evaluate(ALPHAS, 256, SEED)["fid"], rel=1e-9, abs=1e-9)
    assert low["fid"] == pytest.approx(fresh.evaluate(ALPHAS, 64, SEED)["fid"], rel=1e-9, abs=1e-9)
    assert len(high["fit_points"]) == 3 and np.isfinite(high["fid_inf"])

    before = drawn(tmp_path)
    pool = EvaluatorPool(spec, checkpoint_set, reference, store)  # a resumed search: a new pool, same state
    try:
        higher = pool.score([Job.of(ALPHAS, 512, SEED, continued=True)])[0]
    finally:
        pool.close()
    assert drawn(tmp_path) - before == 256 and higher["samples_drawn"] == 256
    assert higher["fid"] == pytest.approx(fresh.evaluate(ALPHAS, 512, SEED)["fid"], rel=1e-9, abs=1e-9)


def test_fid_inf_fit_recovers_the_line_and_uses_halves_and_quarters():
    """FID_n = a + c/n through exact points gives (a, c); the levels come from the same blocks."""
    assert fit_fid_inf([(100.0, 12.0), (50.0, 14.0), (25.0, 18.0)]) == pytest.approx((10.0, 200.0))
    assert fit_fid_inf([(100.0, 12.0)]) is None
    assert block_bounds(8, []) == [0, 2, 4, 6, 8]
    assert block_bounds(16, [0, 2, 4, 8]) == [0, 2, 4, 8, 12, 16]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3))
    blocks = {(i, i + 2): FIDStats.empty(3).update(x[8 * i : 8 * (i + 2)]) for i in range(0, 8, 2)}
    points = fit_points(blocks, 8, np.zeros(3), np.eye(3))
    assert [n for n, _ in points] == [64.0, 32.0, 16.0]
