"""Evaluator actors on a real local Ray: fixed-noise determinism, exact splits, one-hot, zero-copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcsc_ray.checkpoints import load_checkpoint_set, read_state_dict
from lcsc_ray.evaluator import (
    CandidateError,
    chunk_seed,
    chunk_sizes,
    merge_blocks,
    start_evaluators,
    tree_blocks,
)
from lcsc_ray.fid import FIDStats, fid_from_stats, frechet_distance, reference_stats_for
from schemas.search import SearchSpec
from tests import lcsc_plugins

NUM_SAMPLES, BATCH = 96, 20  # 5 chunks, the last one short


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_module):
    """Four tiny checkpoints in the object store and two evaluator actors (1 CPU each)."""
    root = tmp_path_factory.mktemp("lcsc-eval")
    lcsc_plugins.write_run(root / "run", num=4)
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(root / "run")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 3},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {"dataset": {"target": "tests.lcsc_plugins:reference_images"}},
            },
            "evaluators": {"num_actors": 2, "num_cpus": 1, "batch_size": BATCH},
            "output": {"uri": str(root / "out")},
        }
    )
    cset = load_checkpoint_set(spec.checkpoints)
    reference = reference_stats_for(spec)
    actors = start_evaluators(spec, cset, reference, wait_s=120)
    yield spec, cset, reference, actors
    for actor in actors:
        ray_module.kill(actor)


def _direct_fid(spec, state, reference) -> float:
    """FID of one state dict computed in-process, chunk by chunk with the evaluator's seeds."""
    model = lcsc_plugins.build_tiny()
    model.load_state_dict(state)
    model.eval()
    features = []
    with torch.inference_mode():
        for index, size in enumerate(chunk_sizes(NUM_SAMPLES, BATCH)):
            images = lcsc_plugins.toy_sample(model, size, chunk_seed(5, index), 3, BATCH)
            features.append(lcsc_plugins.tiny_features()(images).double().numpy())
    x = np.concatenate(features)
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), *reference)


def test_same_coefficients_same_fid(setup, ray_local):
    """Fixed noise: the same coefficients on two different actors give exactly the same FID."""
    _, _, _, actors = setup
    alphas = [0.1, -0.2, 0.5, 0.6]
    a, b = ray_local.get([actor.evaluate.remote(alphas, NUM_SAMPLES, 5) for actor in actors])
    assert a["fid"] == b["fid"] and a["fid"] > 0
    assert a["num_samples"] == NUM_SAMPLES and a["stats"]["count"] == NUM_SAMPLES
    assert "sum_outer" not in a["stats"]  # the (d, d) sums stay in the evaluator unless asked for
    assert set(a["timings"]) == {"combine_s", "sample_s", "features_s", "total_s"}
    other = ray_local.get(actors[0].evaluate.remote(alphas, NUM_SAMPLES, 6))
    assert other["fid"] != a["fid"]


def test_split_across_actors_equals_one_actor(setup, ray_local):
    """Blocks of the merge tree computed on 2 actors merge to bit-identical statistics and FID."""
    _, _, reference, actors = setup
    alphas = [0.25, 0.25, 0.25, 0.25]
    whole = ray_local.get(actors[0].evaluate.remote(alphas, NUM_SAMPLES, 5, return_stats=True))
    num_chunks = len(chunk_sizes(NUM_SAMPLES, BATCH))
    blocks = tree_blocks(num_chunks, len(actors))
    assert len(blocks) >= 2
    refs = [
        actors[i % 2].evaluate_stats.remote(alphas, 5, range(*block), NUM_SAMPLES)
        for i, block in enumerate(blocks)
    ]
    merged = merge_blocks(num_chunks, {b: FIDStats.from_dict(r) for b, r in zip(blocks, ray_local.get(refs))})
    assert np.array_equal(merged.sum_outer, whole["stats"]["sum_outer"])
    assert fid_from_stats(merged, *reference) == whole["fid"]


def test_one_hot_reproduces_checkpoint_fid(setup, ray_local):
    """One-hot coefficients give that checkpoint's FID as computed independently in this process."""
    spec, cset, reference, actors = setup
    result = ray_local.get(actors[1].evaluate.remote([0, 1, 0, 0], NUM_SAMPLES, 5))
    expected = _direct_fid(spec, read_state_dict(cset.uris[1]), reference)
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    last = ray_local.get(actors[1].evaluate.remote([0, 0, 0, 1], NUM_SAMPLES, 5))
    assert abs(last["fid"] - result["fid"]) > 1e-6


def test_actor_sees_read_only_zero_copy_arrays(setup, ray_local):
    """The checkpoint arrays inside each actor are read-only object-store views."""
    _, _, _, actors = setup
    infos = ray_local.get([actor.info.remote() for actor in actors])
    assert all(info["writeable"] == [False] * 4 for info in infos)
    assert infos[0]["pid"] != infos[1]["pid"]


def test_bad_coefficients_and_blow_up(setup, ray_local):
    """Wrong-length coefficients name the counts; overflowing weights raise CandidateError or report inf."""
    _, _, _, actors = setup
    with pytest.raises(ValueError, match="got 3 coefficients for 4 checkpoints"):
        ray_local.get(actors[0].evaluate.remote([0.5, 0.25, 0.25], NUM_SAMPLES, 5))
    huge = [1e38, 1e38, -1e38, -1e38 + 1]
    with pytest.raises(CandidateError, match="NaN/inf|not finite"):
        ray_local.get(actors[0].evaluate.remote(huge, NUM_SAMPLES, 5))
    flagged = ray_local.get(actors[0].evaluate.remote(huge, NUM_SAMPLES, 5, raise_nonfinite=False))
    assert flagged["nonfinite"] and flagged["fid"] == float("inf")
    stats = FIDStats.from_dict(ray_local.get(actors[0].evaluate_stats.remote([0, 0, 0, 1], 5, [0, 1])))
    assert stats.count == 2 * BATCH
