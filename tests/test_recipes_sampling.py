"""MNIST recipe samplers and diffusion maths: determinism by seed, shapes, range, parametrisation identities."""

from __future__ import annotations

import math

import pytest
import torch

from lcsc_ray.recipes.consistency import boundary_coefs, sampling_timesteps
from lcsc_ray.recipes.diffusion import (
    alpha_bar_schedule,
    ddim_timesteps,
    diffusion_loss,
    noise_scheduler,
    predict_x0_eps,
)
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


def _ddim_by_equation(model: torch.nn.Module, n: int, seed: int, nfe: int) -> torch.Tensor:
    """DDIM at eta 0 written out (Song et al. 2021, Eq. 12) for a v-predicting model: x0 from v, clipped to
    [-1, 1], eps recomputed from the clipped x0, and the last step to alpha_bar = 1."""
    alpha_bar = alpha_bar_schedule("cosine", 1000)
    steps = ddim_timesteps(nfe, 1000)
    x = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(steps):
        a, s = alpha_bar[t].sqrt().item(), (1 - alpha_bar[t]).sqrt().item()
        with torch.no_grad():
            v = model(x, torch.full((n,), t))
        x0 = (a * x - s * v).clamp(-1, 1)
        eps = (x - a * x0) / s
        ab_prev = alpha_bar[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x.clamp(-1, 1)


def test_ddim_sample_follows_the_ddim_equation():
    """The recipe's DDIM (diffusers' DDIMScheduler under the built-in diffusers sampler) takes the steps of the
    DDIM update written out: v-prediction, clipping, recomputed eps and the final alpha_bar = 1 all agree."""
    model = _perturbed(build_unet(**TINY_MODEL))
    for nfe in (1, 4, 10):  # where nfe does not divide T, DDIMScheduler steps to t - T // nfe, not the next t
        torch.testing.assert_close(
            ddim_sample(model, n=4, seed=5, nfe=nfe, batch_size=4),
            _ddim_by_equation(model, n=4, seed=5, nfe=nfe),
            atol=1e-5,
            rtol=0,
        )


def test_training_loss_is_the_v_target_on_the_forward_process():
    """diffusion_loss noises x0 to x_t = a x0 + s eps (DDPMScheduler.add_noise) and regresses v = a eps - s x0
    (get_velocity): a network that outputs exactly that v has zero loss, any other a positive one."""
    scheduler = noise_scheduler("cosine", 1000, "v")
    alpha_bar = alpha_bar_schedule("cosine", 1000)
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1

    def exact_v(x_t, t, seed=9):  # replays the loss's draws: t first, then eps
        generator = torch.Generator().manual_seed(seed)
        t_drawn = torch.randint(0, 1000, (6,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        assert torch.equal(t, t_drawn)
        a = alpha_bar[t].float().sqrt().view(-1, 1, 1, 1)
        s = (1 - alpha_bar[t].float()).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, a * x0 + s * eps, atol=1e-5, rtol=0)
        return a * eps - s * x0

    loss = diffusion_loss(exact_v, x0, torch.Generator().manual_seed(9), scheduler)
    assert float(loss) < 1e-10
    assert (
        float(
            diffusion_loss(
                lambda x_t, t: torch.zeros_like(x_t), x0, torch.Generator().manual_seed(9), scheduler
            )
        )
        > 0.1
    )


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
    """alpha_bar decreases from ~1 to ~0 and is the cosine of Nichol & Dhariwal (Eq. 17); DDIM visits T-1 first
    and spaces evenly; CM steps lie on the grid."""
    for schedule in ("cosine", "linear"):
        alpha_bar = alpha_bar_schedule(schedule, 1000)
        assert alpha_bar.shape == (1000,) and alpha_bar[0] > 0.999 and alpha_bar[-1] < 0.01
        assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    grid = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
    cosine = torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), dim=0)  # written out, float64
    torch.testing.assert_close(alpha_bar_schedule("cosine", 1000), cosine, atol=1e-6, rtol=0)
    assert ddim_timesteps(10, 1000) == [
        999,
        899,
        799,
        699,
        599,
        499,
        399,
        299,
        199,
        99,
    ]  # diffusers' "trailing"
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
