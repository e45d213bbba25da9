"""The LCSC benchmark harness: importing it changes nothing, specs are absolute and valid, verdicts come from
paired intervals, and the claims and fidelity tables pair the right scores."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup():
    """benchmarks/lcsc_setup.py."""
    return load("lcsc_setup")


def summary_row(
    winner: list[float],
    baselines: dict[str, list[float]],
    seed: int = 0,
    samples: int = 1000,
    output: str = "outputs/bench/x",
) -> dict:
    """A summary row as lcsc_setup.summarize makes it, with only what the tables read."""
    return {
        "seed": seed,
        "output": output,
        "budget": 150,
        "nfe": 10,
        "search_num_samples": 500,
        "holdout_seeds": list(range(1001, 1001 + len(winner))),
        "holdout_num_samples": 1000,
        "num_evaluations": 150,
        "search_samples": samples,
        "samples_spent": samples,  # search_fidelity.py's rows: the samples each candidate drew, continued or not
        "total_samples": samples,
        "wall_s": 1.0,
        "gain_found": False,
        "winner_coefficients": [],
        "checkpoints": [],
        "winner_search_fid": 50.0,
        "best_seed_trial_fid": 52.0,
        "winner_holdout_fids": winner,
        "winner_holdout_fid": float(np.mean(winner)),
        "baselines_holdout_fids": baselines,
        "baselines_holdout_fid": {k: float(np.mean(v)) for k, v in baselines.items()},
    }


def test_importing_the_benchmarks_leaves_the_working_directory(tmp_path, monkeypatch):
    """The LCSC benchmarks import as libraries without changing the working directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("lcsc_setup", "search_optimizers", "paper_claims", "search_fidelity", "search_overhead"):
        load(name)
        assert Path(os.getcwd()) == tmp_path, name


def test_specs_use_absolute_paths_and_validate(setup, tmp_path, monkeypatch):
    """make_spec from another directory names the repository's runs by absolute path and is a valid SearchSpec."""
    from schemas.search import SearchSpec

    monkeypatch.chdir(tmp_path)
    spec = SearchSpec.model_validate(setup.make_spec(str(tmp_path / "out"), cm=True, nfe=1, budget=20))
    assert spec.checkpoints.uri == str(ROOT / "outputs" / "bench" / "mnist-cm" / "checkpoints")
    assert spec.sampler.target.endswith(":consistency_sample") and spec.sampler.nfe == 1
    assert spec.search.budget == 20


def test_setting_key_separates_what_changes_an_fid(setup, tmp_path):
    """Searches share cached evaluations only when checkpoints, model and sampler agree."""
    base = setup.make_spec(str(tmp_path / "a"), seed=0, budget=10)
    same = setup.make_spec(str(tmp_path / "b"), seed=3, budget=96, holdout_seeds=[2001])
    assert setup.setting_key(base) == setup.setting_key(same)
    assert setup.setting_key(base) != setup.setting_key(setup.make_spec(str(tmp_path / "c"), nfe=6))
    assert setup.setting_key(base) != setup.setting_key(setup.make_spec(str(tmp_path / "d"), last=8))


def test_a_new_sampler_revision_gets_its_own_cache_and_sets_old_searches_aside(setup, tmp_path, monkeypatch):
    """The recipe's samplers declare a revision: evaluations cached under another revision are not shared, and a
    finished search made with another revision is renamed aside (kept), never loaded as the current one's."""
    import json

    from lcsc_ray.recipes import diffusion

    spec = setup.make_spec(str(tmp_path / "search"))
    key = setup.setting_key(spec)
    monkeypatch.setattr(diffusion.ddim_sample, "lcsc_revision", "next", raising=False)
    assert setup.setting_key(spec) != key
    out = tmp_path / "search"
    (out / "state").mkdir(parents=True)
    (out / "result.json").write_text("{}")
    (out / "state" / "fingerprint.json").write_text(
        json.dumps({"sampler": {"target": "x", "revision": "next"}})
    )
    setup.set_aside_stale(out, spec["sampler"]["target"], verbose=False)
    assert (out / "result.json").exists()  # same revision: kept in place
    monkeypatch.setattr(diffusion.ddim_sample, "lcsc_revision", "after-next")
    setup.set_aside_stale(out, spec["sampler"]["target"], verbose=False)
    assert not out.exists() and (tmp_path / "search.revision-next" / "result.json").exists()


def test_early_checkpoints_are_the_first_third(setup):
    """The short-run claim searches the checkpoints saved by a third of the run's last step."""
    steps = list(range(100, 2600, 100))
    paths = setup.early_checkpoint_paths(steps, 1 / 3)
    assert paths == [f"ckpt_{s:06d}.safetensors" for s in range(100, 900, 100)]
    with pytest.raises(ValueError, match="ckpt_"):
        setup.early_checkpoint_paths([], 1 / 3)


def test_paired_interval_matches_scipy_and_verdicts(setup):
    """The interval is scipy's t interval of the differences; only an interval below 0 is a win."""
    a, b = [60.0, 62.5, 58.0, 61.0, 59.5], [63.0, 64.0, 61.5, 62.0, 63.5]
    d = np.subtract(a, b)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    p = setup.paired(a, b)
    assert p["low"] == pytest.approx(low) and p["high"] == pytest.approx(high)
    assert p["verdict"] == "win"
    assert setup.paired(b, a)["verdict"] == "loss"
    assert setup.paired([60.0, 65.0, 58.0], [61.0, 62.0, 59.0])["verdict"] == "tie"
    assert setup.paired([60.0], [70.0])["verdict"] == "tie (no interval)"


def test_claims_pair_each_model_on_the_same_seeds():
    """The short-run claim compares the early search's winner with the full run's EMA it scored; the NFE claim
    with the CM's base at 2 steps; verdicts follow the paired interval."""
    claims = load("paper_claims")
    early = summary_row(
        [70.0, 72.0, 69.0],
        {
            "last": [90.0, 91.0, 92.0],
            "run-ema": [71.0, 72.5, 70.0],
            "uniform": [80.0, 80.0, 80.0],
            "best-sparse-ema@0.9": [85.0, 84, 86],
        },
    )
    cm = summary_row(
        [40.0, 41.0, 42.0],
        {
            "last": [50.0, 52.0, 51.0],
            "run-ema": [45.0, 46.0, 47.0],
            "uniform": [44.0, 45.0, 46.0],
            "best-sparse-ema@0.9": [43.0, 44, 45],
        },
    )
    cm_base = {"holdout_fids": {"run-ema": [30.0, 31.0, 32.5], "last": [35.0, 36.0, 37.0]}}
    out = {c["claim"].split(" ")[0]: c for c in claims.build_claims({"early": early, "cm": cm}, cm_base)}
    short = out["short"]
    assert short["target"] == "full-run EMA"
    assert short["compared_holdout_fids"]["full-run EMA"] == [71.0, 72.5, 70.0]
    assert short["paired"]["early last"]["verdict"] == "win"
    assert short["verdict"] == "win"  # differences -1.0, -0.5, -1.0: an interval below 0
    assert out["NFE"]["verdict"] == "loss" and out["NFE"]["paired"]["run-ema @2"]["mean"] == pytest.approx(
        10.0 - 0.5 / 3
    )
    assert out["quality"]["paired"]["run-ema"]["mean"] == pytest.approx(-5.0)
    assert "reproduces" in claims.notes([short], {"early": early}, None)[0]


def test_posthoc_claim_targets_the_best_posthoc_ema_its_search_scored():
    """The post-hoc part's claim pairs LCSC with the best post-hoc EMA (whatever sigma_rel won), the run's EMA
    and the last checkpoint, and its spec reads the DDPM run's power-EMA snapshots."""
    claims = load("paper_claims")
    row = summary_row(
        [60.0, 61.0, 62.0],
        {
            "last": [90.0, 91.0, 92.0],
            "run-ema": [64.0, 65.5, 66.0],
            "best-posthoc-ema-0.050": [63.0, 63.5, 65.0],
            "uniform": [70.0, 70, 70],
        },
    )
    (posthoc,) = claims.build_claims({"posthoc": row}, None)
    assert posthoc["target"] == "best-posthoc-ema-0.050"
    assert set(posthoc["paired"]) == {"best-posthoc-ema-0.050", "run-ema", "last"}
    assert posthoc["paired"]["best-posthoc-ema-0.050"]["mean"] == pytest.approx(-8.5 / 3)
    assert (
        claims.posthoc_block("posthoc")["uri"].endswith("posthoc_ema")
        and claims.posthoc_block("ddpm") is None
    )


def test_fidelity_goal_needs_half_the_samples_and_no_loss():
    """A schedule meets the goal with at most half of flat's samples and an interval that is no loss."""
    fidelity = load("search_fidelity")
    flat = [
        summary_row([60.0, 61.0, 62.0], {}, seed=s, samples=48000) | {"config": fidelity.FLAT} for s in (0, 1)
    ]
    cheap = [
        summary_row([60.5, 60.0, 62.5], {}, seed=0, samples=24000),
        summary_row([61.0, 60.5, 61.5], {}, seed=1, samples=24000),
    ]
    row = fidelity.config_row("SH", cheap, flat)
    assert row["sample_ratio_to_flat"] == 0.5
    assert row["vs_flat_over_seed_pairs"]["num_seeds"] == 6
    assert fidelity.goal_met(row)
    worse = [
        summary_row([f + 5 for f in r["winner_holdout_fids"]], {}, seed=r["seed"], samples=24000)
        for r in cheap
    ]
    assert not fidelity.goal_met(fidelity.config_row("SH", worse, flat))


def test_claims_that_do_not_reproduce_say_why_in_numbers():
    """A claim short of a win names the measured gap behind it (NFE: what one more step buys the base)."""
    claims = load("paper_claims")
    cm = summary_row(
        [40.0, 41.0, 42.0],
        {
            "last": [50.0, 52.0, 51.0],
            "run-ema": [45.0, 46.0, 47.0],
            "uniform": [44.0, 45.0, 46.0],
            "best-sparse-ema@0.9": [43.0, 44, 45],
        },
    )
    cm_base = {"holdout_fids": {"run-ema": [30.0, 31.0, 32.5], "last": [35.0, 36.0, 37.0]}}
    nfe = next(c for c in claims.build_claims({"cm": cm}, cm_base) if c["claim"].startswith("NFE"))
    line = claims.notes([nfe], {"cm": cm}, cm_base)[0]
    assert "reversed at this scale" in line
    assert "-14.83" in line  # a second step: base at 2 minus base at 1 = (-15, -15, -14.5) on average
    assert "-5.00" in line  # LCSC at 1 step minus the base at 1 step


def test_optimiser_configs_are_paired_with_the_default_by_seed():
    """Each configuration is compared with the default CMA on the optimiser seeds both ran."""
    optimizers = load("search_optimizers")
    default = [summary_row([60.0 + s, 61.0 + s], {}, seed=s) for s in (0, 1, 2)]
    other = [summary_row([63.0 + s + 0.1 * s, 64.0 + s], {}, seed=s) for s in (0, 1)]
    for r in default + other:
        r["comparisons"], r["winner_search_fid"] = {}, 50.0
    row = optimizers.config_row("NGOpt b3 s0.15", other, default)
    assert row["vs_default"]["num_seeds"] == 2
    assert row["vs_default"]["mean"] == pytest.approx(3.025)  # seed 0: 63.5 - 60.5; seed 1: 64.55 - 61.5


def test_fidelity_notes_judge_the_goal_only_when_a_schedule_ran():
    """With only the flat search finished, the notes do not claim that no schedule met the goal."""
    fidelity = load("search_fidelity")
    flat = [summary_row([60.0, 61.0], {}, seed=0, samples=48000)]
    only_flat = fidelity.notes([fidelity.config_row(fidelity.FLAT, flat, flat)])
    assert not any("No schedule" in n for n in only_flat)
    worse = [summary_row([70.0, 72.0], {}, seed=0, samples=48000)]
    both = fidelity.notes(
        [fidelity.config_row(fidelity.FLAT, flat, flat), fidelity.config_row("SH", worse, flat)]
    )
    assert any("No schedule" in n for n in both)
