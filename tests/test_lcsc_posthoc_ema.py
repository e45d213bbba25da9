"""Post-hoc EMA (EDM2): sigma_rel <-> gamma, the power-EMA update, the least-squares reconstruction, the
projection on checkpoints, the recipe's snapshots and the search's post-hoc EMA baseline and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate

from lcsc_ray import posthoc_ema as ph


def test_sigma_rel_gamma_round_trip_matches_the_paper():
    """EDM2's pairs: gamma 16.97 <-> sigma_rel 0.05 and gamma 6.94 <-> sigma_rel 0.10, both ways."""
    assert ph.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert ph.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert ph.gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=2e-5)
    assert ph.gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=2e-4)
    for sigma in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert ph.gamma_to_sigma_rel(ph.sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-10)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        ph.sigma_rel_to_gamma(0.3)


def test_inner_products_match_numerical_integration():
    """<p_a, p_b> in closed form equals scipy's quadrature of the two profiles' product."""

    def profile(tau, t, g):
        return (g + 1) * tau**g / t ** (g + 1) if tau <= t else 0.0

    for ta, ga, tb, gb in [
        (300.0, 6.94, 1000.0, 16.97),
        (1000.0, 16.97, 400.0, 2.0),
        (500.0, 3.0, 500.0, 3.0),
    ]:
        expected, _ = integrate.quad(
            lambda tau, ta=ta, ga=ga, tb=tb, gb=gb: profile(tau, ta, ga) * profile(tau, tb, gb),
            0,
            max(ta, tb),
            points=[min(ta, tb)],
            limit=200,
        )
        assert ph.profile_inner_products(ta, ga, tb, gb) == pytest.approx(expected, rel=1e-7)


def test_power_ema_weights_are_the_profile_mass_of_each_step():
    """Unrolled, beta_t = (1 - 1/t)^(gamma+1) weighs step tau by the profile's mass over (tau - 1, tau]."""
    gamma, steps = 6.94, 50
    weights = np.zeros(steps)  # the weight of theta_tau in the EMA after `steps` updates
    for t in range(1, steps + 1):
        beta = ph.power_beta(t, gamma)
        weights *= beta
        weights[t - 1] += 1 - beta
    taus = np.arange(1, steps + 1, dtype=float)
    mass, _ = ph.profile_mass(gamma, steps, taus - 1, taus)
    np.testing.assert_allclose(weights, mass, rtol=1e-10, atol=1e-15)


def test_solve_reproduces_a_stored_snapshot_exactly():
    """Asking for a snapshot's own (sigma_rel, step) gives coefficient 1 on it and 0 elsewhere."""
    gammas = [ph.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    steps = [100 * (i + 1) for i in range(10)]
    snap_steps = [s for s in steps for _ in gammas]
    snap_gammas = [g for _ in steps for g in gammas]
    x = ph.solve_coefficients(snap_steps, snap_gammas, 700, gammas[1])
    expected = np.zeros(len(snap_steps))
    expected[snap_steps.index(700) + 1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


def _trajectory(steps: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """A smooth synthetic weight trajectory with a little noise: (steps, dim), row tau-1 = weights after step tau."""
    rng = np.random.default_rng(seed)
    tau = np.arange(1, steps + 1)[:, None]
    phase, freq = rng.uniform(0, 2 * np.pi, dim), rng.uniform(1, 4, dim)
    return np.sin(freq * tau / steps * np.pi + phase) + 0.05 * rng.standard_normal((steps, dim))


def test_reconstruction_approximates_the_true_running_power_ema():
    """Snapshots of EMAs at sigma_rel 0.05 and 0.10 every 100 steps rebuild the running power EMA of
    sigma_rel 0.15 (computed step by step) far closer than the nearest snapshot is."""
    steps, every = 2000, 100
    theta = _trajectory(steps)
    gammas = [ph.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    target_gamma = ph.sigma_rel_to_gamma(0.15)
    emas = [theta[0].copy() for _ in (*gammas, target_gamma)]
    snapshots, snap_steps, snap_gammas = [], [], []
    for t in range(1, steps + 1):
        for i, g in enumerate((*gammas, target_gamma)):
            beta = ph.power_beta(t, g)
            emas[i] = beta * emas[i] + (1 - beta) * theta[t - 1]
        if t % every == 0:
            for i, g in enumerate(gammas):
                snapshots.append(emas[i].copy())
                snap_steps.append(t)
                snap_gammas.append(g)
    truth = emas[2]
    x = ph.solve_coefficients(snap_steps, snap_gammas, steps, target_gamma)
    rebuilt = np.tensordot(x, np.stack(snapshots), axes=1)
    nearest = emas[1]  # the sigma_rel 0.10 EMA at the last step
    assert np.abs(x.sum() - 1) < 1e-12
    assert np.linalg.norm(rebuilt - truth) < 0.02 * np.linalg.norm(nearest - truth)


def test_checkpoint_projection_is_exact_for_linear_weights():
    """The hat projection on checkpoints sums to 1 and rebuilds the power EMA exactly when the weights are
    linear in the step (the continuous profile's mean step equals sum_i alpha_i s_i)."""
    gamma, step = ph.sigma_rel_to_gamma(0.10), 1000.0
    checkpoint_steps = [100, 250, 400, 550, 700, 850, 1000]
    alphas = ph.checkpoint_coefficients(gamma, step, checkpoint_steps)
    assert alphas.sum() == pytest.approx(1.0, abs=1e-12) and (alphas >= 0).all()
    mean_step = (gamma + 1) / (gamma + 2) * step  # the profile's first moment
    assert float(alphas @ np.asarray(checkpoint_steps, float)) == pytest.approx(mean_step, rel=1e-9)
    # a narrower profile puts more weight on the last checkpoint
    narrow = ph.checkpoint_coefficients(ph.sigma_rel_to_gamma(0.05), step, checkpoint_steps)
    assert narrow[-1] > alphas[-1]


def test_power_ema_class_tracks_the_update_rule():
    """PowerEMA.update follows beta_t exactly for every float tensor and survives a state round trip."""
    model = torch.nn.Linear(3, 2)
    tracker = ph.PowerEMA(model, (0.05, 0.10))
    expected = [{k: v.clone().double() for k, v in model.state_dict().items()} for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    for t in range(1, 21):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        tracker.update(model, t)
        for gamma, ema in zip(tracker.gammas, expected):
            beta = ph.power_beta(t, gamma)
            for k, v in model.state_dict().items():
                ema[k] = beta * ema[k] + (1 - beta) * v.double()
    for (_, _, state), ema in zip(tracker.snapshots(), expected):
        for k in state:
            torch.testing.assert_close(state[k].double(), ema[k], rtol=1e-5, atol=1e-6)
    other = ph.PowerEMA(torch.nn.Linear(3, 2), (0.05, 0.10))
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.emas[1]["weight"], tracker.emas[1]["weight"])


def test_recipe_saves_power_ema_snapshots_that_resume_exactly(tmp_path):
    """The DDPM recipe saves both power-EMA snapshots beside each checkpoint with step and gamma; after an
    interrupted and resumed run they equal the power EMA computed independently from the saved checkpoints."""
    from lcsc_ray.recipes import checkpoints as ckpt
    from lcsc_ray.recipes.mnist import train_ddpm
    from lcsc_ray.recipes.training import TrainingInterrupted

    out = str(tmp_path / "run")
    config = {
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 1,
        "warmup_steps": 1,
        "grid_samples": 0,
        "model": {"channels": [8, 16], "emb_dim": 16, "groups": 4, "attention": False},
        "progress_interval_s": 60,
        "out": out,
    }
    with pytest.raises(TrainingInterrupted):
        train_ddpm(config, stop_after=2)
    train_ddpm(config)
    weights = [ckpt.load_weights(uri)[0] for _, uri in ckpt.list_checkpoints(f"{out}/checkpoints")]
    assert len(weights) == 4
    for sigma_rel in (0.05, 0.10):
        gamma = ph.sigma_rel_to_gamma(sigma_rel)
        expected = {k: v.double() for k, v in weights[0].items()}  # beta_1 = 0: the first step's weights
        for t in range(2, 5):
            beta = ph.power_beta(t, gamma)
            expected = {k: beta * expected[k] + (1 - beta) * weights[t - 1][k].double() for k in expected}
        snapshot, meta = ckpt.load_weights(f"{out}/{ph.SNAPSHOT_FOLDER}/{ph.snapshot_name(sigma_rel, 4)}")
        assert meta["step"] == "4" and float(meta["gamma"]) == pytest.approx(gamma, rel=1e-12)
        assert float(meta["sigma_rel"]) == sigma_rel
        for key, value in expected.items():
            torch.testing.assert_close(snapshot[key].double(), value, rtol=1e-5, atol=1e-6)


def write_snapshots(folder, states: list[dict], steps: list[int], sigma_rels=(0.05, 0.10)) -> None:
    """Power-EMA snapshots of a run whose weights move linearly between the checkpoint states, saved at each
    checkpoint step with the recipe's names and metadata."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gammas = [ph.sigma_rel_to_gamma(s) for s in sigma_rels]
    emas = [{k: v.double().clone() for k, v in states[0].items()} for _ in gammas]
    anchors = [0, *steps]
    path = [states[0], *states]
    for t in range(1, steps[-1] + 1):
        i = next(j for j in range(1, len(anchors)) if t <= anchors[j])  # t lies in (anchors[i-1], anchors[i]]
        w = (t - anchors[i - 1]) / (anchors[i] - anchors[i - 1])
        for gamma, ema in zip(gammas, emas):
            beta = ph.power_beta(t, gamma)
            for k in ema:
                if ema[k].is_floating_point():
                    current = (1 - w) * path[i - 1][k].double() + w * path[i][k].double()
                    ema[k] = beta * ema[k] + (1 - beta) * current
        if t in steps:
            for sigma, gamma, ema in zip(sigma_rels, gammas, emas):
                tensors = {k: v.to(states[0][k].dtype).contiguous() for k, v in ema.items()}
                save_file(
                    tensors,
                    str(folder / ph.snapshot_name(sigma, t)),
                    metadata=ph.snapshot_metadata(sigma, gamma, t),
                )


def test_snapshot_without_metadata_is_refused_naming_the_fix(tmp_path):
    """A .safetensors file in the snapshot folder without step/gamma metadata is an error naming the glob."""
    from safetensors.torch import save_file

    from schemas.errors import CheckpointError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"step": "10"})
    with pytest.raises(CheckpointError, match="posthoc_ema.glob"):
        ph.list_snapshots(str(tmp_path), "*.safetensors", 100)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_reports_best_posthoc_ema_and_seeds_with_it(ray_local, tmp_path):
    """With `posthoc_ema`, the search scores the sigma_rel grid from the snapshots, reports the best of it on the
    search seed as `best-posthoc-ema-<sigma>` with a paired comparison, and seeds the search with its projection."""
    import pandas as pd

    from lcsc_ray.report import format_table
    from lcsc_ray.search import run_search
    from tests.lcsc_plugins import trajectory, write_run
    from tests.test_lcsc_search import tiny_spec

    steps = [100, 200, 300, 400, 500]
    write_run(tmp_path / "ckpts", num=5, steps=steps)
    write_snapshots(tmp_path / "phema", trajectory(5), steps)
    spec = tiny_spec(tmp_path, budget=5)  # the seeds only: last, the post-hoc EMA, ema@0.5, ema@0.8, uniform
    grid = [0.05, 0.10, 0.20]
    spec = spec.model_validate(
        {**spec.model_dump(), "posthoc_ema": {"uri": str(tmp_path / "phema"), "sigma_rels": grid}}
    )
    result = run_search(spec)

    assert [entry.sigma_rel for entry in result.posthoc_ema] == grid
    assert len(result.posthoc_snapshots) == 10 and all(np.isfinite(e.fid) for e in result.posthoc_ema)
    best = min(result.posthoc_ema, key=lambda entry: entry.fid)
    baseline = next(b for b in result.baselines if b.label.startswith("best-posthoc-ema-"))
    assert baseline.label == ph.posthoc_label(best.sigma_rel)
    assert baseline.fid == best.fid and baseline.coefficients == [] and len(baseline.holdout_fids) == 2
    assert any(c.baseline == baseline.label for c in result.comparisons)
    assert f"{baseline.label}" in format_table(result) and "post-hoc EMA (EDM2) at step 500" in format_table(
        result
    )
    # the reconstruction is EDM2's solve over the snapshots at the last checkpoint's step
    snapshot_steps = [s for s in steps for _ in range(2)]
    gammas = [ph.sigma_rel_to_gamma(s) for _ in steps for s in (0.10, 0.05)]  # by step, then gamma
    expected = ph.solve_coefficients(snapshot_steps, gammas, 500, ph.sigma_rel_to_gamma(best.sigma_rel))
    np.testing.assert_allclose(best.snapshot_coefficients, expected, atol=1e-9)
    # the seed phase evaluated its projection on the checkpoints
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    seed_rows = trials[(trials.phase == "seeds") & (trials.label == ph.seed_label(best.sigma_rel))]
    assert len(seed_rows) == 1
    projected = ph.checkpoint_coefficients(ph.sigma_rel_to_gamma(best.sigma_rel), 500, steps)
    np.testing.assert_allclose(seed_rows.coefficients.iloc[0], projected, atol=1e-9)


def test_run_posthoc_picks_the_best_of_the_grid_as_baseline_and_seed():
    """The grid entry with the lowest search-seed FID becomes the baseline (zero on the checkpoints, then its
    snapshot weights) and, projected on the checkpoint steps, the seed; a failed entry never wins."""
    from types import SimpleNamespace

    from lcsc_ray.coefficients import seed_vectors
    from lcsc_ray.search import run_posthoc
    from schemas.search import SearchSpec

    spec = SearchSpec.model_validate({"posthoc_ema": {"uri": "unused", "sigma_rels": [0.05, 0.10, 0.20]}})
    snapshots = [
        ph.Snapshot(f"s{i}", step, g)
        for i, (step, g) in enumerate(
            (s, ph.sigma_rel_to_gamma(r)) for s in (100, 200, 300) for r in (0.10, 0.05)
        )
    ]
    plan = ph.PosthocPlan(snapshots, 300, ph.grid_coefficients(snapshots, [0.05, 0.10, 0.20], 300))
    fids = iter([3.0, 1.0, 0.5])
    statuses = iter(["ok", "ok", "failed"])
    pool = SimpleNamespace(
        score=lambda jobs, progress: [
            {"fid": next(fids), "status": next(statuses), "alphas": list(job.alphas)} for job in jobs
        ]
    )
    run = SimpleNamespace(
        spec=spec,
        num_checkpoints=3,
        pool=pool,
        parametrization="difference",
        checkpoints=SimpleNamespace(steps=[100, 200, 300]),
    )
    grid, seed, baseline = run_posthoc(run, plan)
    assert [entry["fid"] for entry in grid] == [3.0, 1.0, float("inf")]
    assert list(baseline) == ["best-posthoc-ema-0.100"]
    assert baseline["best-posthoc-ema-0.100"][:3] == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(baseline["best-posthoc-ema-0.100"][3:], plan.coefficients[0.10])
    ((label, alphas),) = seed
    assert label == "phema@0.100"
    np.testing.assert_allclose(
        alphas, ph.checkpoint_coefficients(ph.sigma_rel_to_gamma(0.10), 300, [100, 200, 300])
    )
    assert [name for name, _ in seed_vectors(3, spec, extra=seed)][:2] == ["last", "phema@0.100"]
