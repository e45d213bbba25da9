"""Large evaluations split across the pool's evaluators merge to the FID one evaluator computes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lcsc_ray.checkpoints import load_checkpoint_set, read_state_dict
from lcsc_ray.evaluator import Evaluator, chunk_seed, chunk_sizes
from lcsc_ray.fid import frechet_distance, reference_stats_for
from lcsc_ray.pool import EvaluatorPool, Job
from schemas.search import SearchSpec
from tests import lcsc_plugins

SAMPLES, BATCH, SEED = 100, 16, 9  # 7 chunks, the last one short: blocks of unequal size


def split_spec(tmp_path: Path, split_min_samples: int | None) -> SearchSpec:
    """Three tiny checkpoints, two evaluators of half a CPU, jobs of >= `split_min_samples` split."""
    if not (tmp_path / "ckpts").exists():
        lcsc_plugins.write_run(tmp_path / "ckpts", num=3)
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 32,
            },
            "evaluators": {
                "num_actors": 2,
                "batch_size": BATCH,
                "num_cpus": 0.5,
                "split_min_samples": split_min_samples,
            },
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def direct_fid(state: dict, reference) -> float:
    """FID of one state dict in this process: chunk j's noise from chunk_seed(SEED, j), as an unsplit run."""
    model = lcsc_plugins.build_tiny()
    model.load_state_dict(state)
    features = []
    with torch.inference_mode():
        for index, size in enumerate(chunk_sizes(SAMPLES, BATCH)):
            images = lcsc_plugins.toy_sample(model.eval(), size, chunk_seed(SEED, index), 2, BATCH)
            features.append(lcsc_plugins.tiny_features()(images).double().numpy())
    x = np.concatenate(features)
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), *reference)


@pytest.mark.timeout(240)
def test_split_job_equals_unsplit_evaluation(tmp_path, ray_local):
    """A job over the threshold runs on both evaluators and its FID equals one evaluator's to 1e-9."""
    spec = split_spec(tmp_path, split_min_samples=SAMPLES)
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    reference = reference_stats_for(spec)
    alphas = [0.3, -0.1, 0.8]
    whole = Evaluator(spec, checkpoint_set, reference_mu=reference[0], reference_sigma=reference[1])
    unsplit = whole.evaluate(alphas, SAMPLES, SEED)["fid"]
    pool = EvaluatorPool(spec, checkpoint_set, reference)
    try:
        split, small = pool.score([Job.of(alphas, SAMPLES, SEED), Job.of(alphas, SAMPLES - 1, SEED)])
        state = pool.state()
        one_hot = pool.score([Job.of([0, 1, 0], SAMPLES, SEED)])[0]
        diverged = pool.score([Job.of([1e38, 1e38, -2e38 + 1], SAMPLES, SEED)])[0]
    finally:
        pool.close()
    assert state["split_jobs"] == 1  # only the job at the threshold was split, the smaller one was not
    assert split["status"] == "ok" and split["fid"] == pytest.approx(unsplit, rel=1e-9, abs=1e-9)
    assert small["status"] == "ok" and small["fid"] != split["fid"]
    # the shares drew the noise of the unsplit run's chunks: an independent in-process FID agrees
    expected = direct_fid(read_state_dict(checkpoint_set.uris[1]), reference)
    assert one_hot["fid"] == pytest.approx(expected, rel=1e-6)
    assert diverged["status"] == "nonfinite" and math.isinf(diverged["fid"])
