"""Pure logic of the LCSC engine, without Ray: combination, FID arithmetic, merge trees, plug-ins."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lcsc_ray.combine import CoefficientError, combine_into, combine_naive
from lcsc_ray.evaluator import chunk_seed, chunk_sizes, tree_blocks, tree_merge
from lcsc_ray.fid import (
    FIDError,
    FIDStats,
    frechet_distance,
    load_reference_stats,
    reference_cache_key,
    reference_stats_for,
    save_reference_stats,
)
from lcsc_ray.plugins import PluginError, build, resolve
from schemas.common import PluginSpec
from schemas.search import SearchSpec


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return x, x.mean(0), np.cov(x, rowvar=False)


def test_combine_matches_naive_sum_across_chunk_edges():
    """The streamed combination equals the float64 sum, for sizes that are not a multiple of the chunk."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    alphas = [2.5, -1.0, 0.25, -0.75, 0.0]
    out = np.empty(1000, np.float32)
    result = combine_into(out, arrays, alphas, chunk_size=64)
    assert result is out
    np.testing.assert_allclose(out, combine_naive(arrays, alphas), rtol=1e-5, atol=1e-5)


def test_combine_reads_bf16_bits_and_torch_output():
    """bfloat16 storage (uint16 bits) combines into a float32 torch buffer like the bf16 values themselves."""
    values = [torch.randn(300) for _ in range(3)]
    bits = [v.to(torch.bfloat16).view(torch.uint16).numpy() for v in values]
    out = torch.empty(300)
    combine_into(out, bits, [0.5, 0.25, 0.25])
    expected = sum(a * v.to(torch.bfloat16).float() for a, v in zip([0.5, 0.25, 0.25], values))
    torch.testing.assert_close(out, expected)


def test_combine_wrong_number_of_coefficients():
    """Five coefficients for six checkpoints is an error that says so."""
    arrays = [np.ones(4, np.float32)] * 6
    with pytest.raises(CoefficientError, match="got 5 coefficients for 6 checkpoints"):
        combine_into(np.empty(4, np.float32), arrays, [0.2] * 5)
    with pytest.raises(CoefficientError, match="finite"):
        combine_into(np.empty(4, np.float32), arrays, [np.nan] + [0.2] * 5)


def test_frechet_matches_scipy_sqrtm():
    """The eigh form agrees with scipy's sqrtm form to 1e-9 relative in float64."""
    rng = np.random.default_rng(1)
    _, mu1, s1 = _gaussian_stats(rng, 400, 32)
    _, mu2, s2 = _gaussian_stats(rng, 400, 32, shift=0.4)
    ours, reference = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(reference, rel=1e-9)


def test_frechet_rank_deficient_and_same_set():
    """Rank-deficient covariances still agree with scipy; the same statistics give exactly 0 (clamped)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 40))  # 10 samples in 40 dims: rank 9
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    y = rng.standard_normal((10, 40)) + 0.1
    assert frechet_distance(mu, s, y.mean(0), np.cov(y, rowvar=False)) == pytest.approx(
        _scipy_fid(mu, s, y.mean(0), np.cov(y, rowvar=False)), rel=1e-6
    )
    assert frechet_distance(mu, s, mu, s) == 0.0


def test_frechet_clamps_negative_rounding():
    """A distance that rounds below zero is reported as 0, never negative."""
    s = np.diag([1e-30, 1.0])
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s) >= 0.0


def test_frechet_rejects_mismatched_and_nonfinite():
    """Mismatched dimensions and NaN statistics are errors naming the problem."""
    with pytest.raises(FIDError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="sigma2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


def test_stats_match_numpy_and_merge_equals_whole():
    """Mean and unbiased covariance equal numpy's; the merge of two halves equals the whole set."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((301, 7)) * 3 + 5
    whole = FIDStats.empty(7).update(x)
    merged = FIDStats.empty(7).update(x[:120]).merge(FIDStats.empty(7).update(torch.from_numpy(x[120:])))
    np.testing.assert_allclose(whole.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.cov, np.cov(x, rowvar=False), rtol=1e-9)
    assert merged.count == 301
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-12)
    back = FIDStats.from_dict(merged.to_dict())
    assert back.count == 301 and np.array_equal(back.sum_outer, merged.sum_outer)


def test_tree_merge_is_split_invariant_bit_for_bit():
    """Merging aligned blocks of the canonical tree gives bit-identical sums to merging every chunk."""
    rng = np.random.default_rng(4)
    chunks = [rng.standard_normal((50, 5)) * 10 ** rng.uniform(-3, 3) for _ in range(11)]

    def leaf(lo, hi):
        return FIDStats.empty(5).update(chunks[lo]) if hi - lo == 1 else None

    whole = tree_merge(0, 11, leaf)
    for parts in (2, 3, 5):
        blocks = tree_blocks(11, parts)
        assert len(blocks) >= parts and blocks[0][0] == 0 and blocks[-1][1] == 11
        computed = {b: tree_merge(*b, leaf) for b in blocks}
        split = tree_merge(0, 11, lambda lo, hi, known=computed: known.get((lo, hi)))
        assert np.array_equal(split.sum_outer, whole.sum_outer) and np.array_equal(split.sum, whole.sum)


def test_chunk_seeds_and_sizes():
    """Chunks cover the samples exactly; seeds differ per chunk and per evaluation seed."""
    assert chunk_sizes(1000, 250) == [250] * 4 and chunk_sizes(510, 250) == [250, 250, 10]
    seeds = {chunk_seed(s, j) for s in range(3) for j in range(4)}
    assert len(seeds) == 12 and chunk_seed(0, 1) == chunk_seed(0, 1)


def test_reference_stats_roundtrip_and_cache(tmp_path, monkeypatch):
    """Reference stats are saved as mu/sigma .npz, computed once from the dataset plug-in, then reused."""
    save_reference_stats(str(tmp_path / "ref.npz"), np.arange(3.0), np.eye(3))
    mu, sigma = load_reference_stats(str(tmp_path / "ref.npz"))
    assert mu.tolist() == [0.0, 1.0, 2.0] and sigma.shape == (3, 3)
    spec = SearchSpec.model_validate(
        {
            "output": {"uri": str(tmp_path / "out")},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 64}}
                },
            },
        }
    )
    mu1, sigma1 = reference_stats_for(spec)
    from tests import lcsc_plugins

    features = lcsc_plugins.tiny_features()(lcsc_plugins.reference_images(n=64)).detach().double().numpy()
    np.testing.assert_allclose(mu1, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma1, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)
    cached = tmp_path / "out" / "reference_stats" / f"{reference_cache_key(spec)}.npz"
    assert cached.is_file()
    monkeypatch.setattr(lcsc_plugins, "reference_images", lambda **kw: pytest.fail("recomputed"))
    mu2, _ = reference_stats_for(spec)
    assert np.array_equal(mu1, mu2)


def test_plugins_resolve_and_errors():
    """Plug-ins resolve by import path; a missing module or attribute is an error naming the target."""
    assert resolve("numpy:zeros") is np.zeros
    assert build(PluginSpec(target="numpy:arange", kwargs={"stop": 3})).tolist() == [0, 1, 2]
    with pytest.raises(PluginError, match="nosuchmod_xyz"):
        resolve("nosuchmod_xyz:f")
    with pytest.raises(PluginError, match="numpy:no_such_thing"):
        resolve("numpy:no_such_thing")


def test_frechet_matches_torchmetrics_with_same_features():
    """Our FID over a feature module equals torchmetrics' FrechetInceptionDistance given that module."""
    torchmetrics_image = pytest.importorskip("torchmetrics.image.fid")
    from tests.lcsc_plugins import reference_images, tiny_features

    class Probe(torch.nn.Module):  # torchmetrics probes the module with one uint8 (1, 3, 299, 299) image
        def __init__(self):
            super().__init__()
            self.net = tiny_features(dim=6)

        def forward(self, x):
            return self.net(torch.nn.functional.adaptive_avg_pool2d(x[:, :1].float(), 8))

    net = Probe()
    real, fake = reference_images(n=200, seed=1), reference_images(n=150, seed=2) * 0.8 + 0.05
    metric = torchmetrics_image.FrechetInceptionDistance(feature=net, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    ours = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert ours > 0.01
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)
