"""MNIST recipe samplers and diffusion maths: determinism by seed, shapes, range, parametrisation identities."""

from __future__ import annotations

import math

import pytest
import torch

from lcsc_ray.recipes.consistency import boundary_coefs, sampling_timesteps
from lcsc_ray.recipes.diffusion import alpha_bar_schedule, ddim_timesteps, predict_x0_eps
from lcsc_ray.recipes.mnist import build_consistency_model, build_unet, consistency_sample, ddim_sample

TINY_MODEL = {"channels": [8, 16], "emb_dim": 16, "groups": 4, "attention": False}


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The skeleton's output layer is zero-initialised; give every weight random values so samples vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_build_unet_is_deterministic_and_sized():
    """build_unet gives identical weights for identical kwargs; the default has 0.5-1.5M parameters."""
    a, b = build_unet(), build_unet()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert 500_000 <= sum(p.numel() for p in a.parameters()) <= 1_500_000
    assert a(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999])).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown U-Net options"):
        build_unet(chanels=[8, 16])


def test_ddim_sample_is_deterministic_by_seed():
    """Same model and seed give identical images, another seed differs; shape (n,1,28,28), values in [-1,1]."""
    model = _perturbed(build_unet(**TINY_MODEL))
    first = ddim_sample(model, n=7, seed=3, nfe=4, batch_size=3)
    again = ddim_sample(model, n=7, seed=3, nfe=4, batch_size=7)
    other = ddim_sample(model, n=7, seed=4, nfe=4, batch_size=7)
    assert first.shape == (7, 1, 28, 28) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1 and first.std() > 0.05
    torch.testing.assert_close(first, again, atol=1e-5, rtol=0)  # batch size does not change the noise
    assert (first - other).abs().mean() > 0.05
    assert torch.equal(first, ddim_sample(model, n=7, seed=3, nfe=4, batch_size=3))


def test_consistency_sample_is_deterministic_and_multistep_differs():
    """consistency_sample is fixed by the seed; 1-step and 2-step samples differ; boundary f(x, 0) = x."""
    model = _perturbed(build_consistency_model(**TINY_MODEL))
    one = consistency_sample(model, n=5, seed=0, nfe=1, batch_size=2)
    assert torch.equal(one, consistency_sample(model, n=5, seed=0, nfe=1, batch_size=2))
    two = consistency_sample(model, n=5, seed=0, nfe=2, batch_size=5)
    assert one.shape == two.shape == (5, 1, 28, 28) and one.abs().max() <= 1
    assert (one - two).abs().mean() > 1e-3
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x, torch.zeros(3, dtype=torch.long)), x)  # c_skip(0)=1, c_out(0)=0
    c_skip, c_out = boundary_coefs(torch.tensor([0, 20, 999]))
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten()[0] == 0 and c_skip.flatten()[2] < 1e-6


def test_schedules_and_timesteps():
    """alpha_bar decreases from ~1 to ~0; DDIM visits T-1 first and spaces evenly; CM steps lie on the grid."""
    for schedule in ("cosine", "linear"):
        alpha_bar = alpha_bar_schedule(schedule, 1000)
        assert alpha_bar.shape == (1000,) and alpha_bar[0] > 0.999 and alpha_bar[-1] < 0.01
        assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    assert ddim_timesteps(10, 1000) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert ddim_timesteps(1, 1000) == [999]
    assert sampling_timesteps(2, 1000) == [999, 500]


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_parametrisations_recover_x0_and_eps(prediction):
    """A network that outputs the exact v / eps / x0 target lets predict_x0_eps recover x0 and eps exactly."""
    alpha_bar = alpha_bar_schedule("cosine", 1000)
    x0, eps = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 990])
    a = alpha_bar[t].float().sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar[t].float()).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    target = {"v": a * eps - s * x0, "eps": eps, "x0": x0}[prediction]
    got_x0, got_eps = predict_x0_eps(lambda x, tt: target, x_t, t, alpha_bar, prediction)
    torch.testing.assert_close(got_x0[1:3], x0[1:3], atol=1e-4, rtol=0)
    torch.testing.assert_close(got_eps[1:3], eps[1:3], atol=1e-4, rtol=0)
    assert math.isclose(float(a[0] ** 2 + s[0] ** 2), 1.0, rel_tol=1e-6)
