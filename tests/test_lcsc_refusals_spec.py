"""Search specs refuse what they would otherwise silently get wrong: plug-ins that do not fit the checkpoint
format, and a budget too small for the seed vectors (which would drop baselines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcsc_ray.run_identity import preflight
from schemas import SpecError, parse_spec
from schemas.search import CheckpointSetSpec, SamplerSpec, SearchSpec
from tests.lcsc_plugins import write_run

ROOT = Path(__file__).resolve().parents[1]
DIFFUSERS_SAMPLER = "lcsc_ray.diffusers_sampling:sample"
DIFFUSERS_MODEL = "lcsc_ray.diffusers_checkpoints:build_model"
MNIST_SAMPLER = "lcsc_ray.recipes.mnist:ddim_sample"


def _diffusers(**fields) -> dict:
    return {
        "checkpoints": {"uri": "runs/ddpm", "format": "diffusers"},
        "output": {"uri": "outputs/x"},
        **fields,
    }


def test_sampler_block_without_target_follows_the_diffusers_format():
    """A `sampler:` block with only nfe and kwargs gets the diffusers sampler, keeping its nfe and kwargs."""
    spec = parse_spec(_diffusers(sampler={"nfe": 7, "kwargs": {"scheduler": "Euler"}}), SearchSpec)
    assert spec.sampler.target == DIFFUSERS_SAMPLER
    assert spec.sampler.nfe == 7 and spec.sampler.kwargs == {"scheduler": "Euler"}
    assert spec.model.target == DIFFUSERS_MODEL
    assert SearchSpec.model_validate(spec.model_dump()) == spec  # round-trips


def test_sampler_spec_object_without_target_follows_the_diffusers_format():
    """A SamplerSpec built in Python without a target gets the diffusers sampler too; an explicit one is kept."""
    checkpoints = CheckpointSetSpec(uri="runs/ddpm", format="diffusers")
    spec = SearchSpec(checkpoints=checkpoints, sampler=SamplerSpec(nfe=3), output={"uri": "outputs/x"})
    assert spec.sampler.target == DIFFUSERS_SAMPLER and spec.sampler.nfe == 3
    own = SearchSpec(
        checkpoints=checkpoints,
        sampler=SamplerSpec(target="tests.lcsc_plugins:toy_sample"),
        output={"uri": "outputs/x"},
    )
    assert own.sampler.target == "tests.lcsc_plugins:toy_sample"


def test_files_format_sampler_block_without_target_keeps_the_mnist_default():
    """Under `format: files` a `sampler:` block without target still means the MNIST recipe's sampler."""
    spec = parse_spec({"sampler": {"nfe": 3}}, SearchSpec)
    assert spec.sampler.target == MNIST_SAMPLER and spec.sampler.nfe == 3


@pytest.mark.parametrize(
    "field,block",
    [
        ("sampler.target", {"sampler": {"target": MNIST_SAMPLER}}),
        ("model.target", {"model": {"target": "lcsc_ray.recipes.mnist:build_unet"}}),
        ("model.target", {"model": {"target": "lcsc_ray.recipes.mnist:build_consistency_model"}}),
    ],
)
def test_mnist_plugins_under_diffusers_format_are_refused(field, block):
    """The MNIST recipe's model or sampler under `format: diffusers` is refused, naming the field and the fix."""
    with pytest.raises(SpecError) as info:
        parse_spec(_diffusers(**block), SearchSpec)
    message = str(info.value)
    assert f"`{field}`" in message and "checkpoints.format: diffusers" in message
    assert (DIFFUSERS_SAMPLER if field.startswith("sampler") else DIFFUSERS_MODEL) in message


@pytest.mark.parametrize(
    "spec_data,field",
    [
        ({"model": {"target": DIFFUSERS_MODEL, "kwargs": {"config_uri": "m/config.json"}}}, "sampler.target"),
        ({"sampler": {"target": DIFFUSERS_SAMPLER}}, "model.target"),
    ],
)
def test_mixed_builtin_families_are_refused(spec_data, field):
    """The diffusers model with the MNIST sampler (or the reverse) is refused, naming the field to change."""
    with pytest.raises(SpecError, match=rf"`{field}`"):
        parse_spec(spec_data, SearchSpec)


def test_diffusers_builtins_over_flat_files_stay_valid():
    """The diffusers model and sampler together may read flat files (`format: files`)."""
    spec = parse_spec(
        {
            "model": {"target": DIFFUSERS_MODEL, "kwargs": {"config_uri": "m/config.json"}},
            "sampler": {"target": DIFFUSERS_SAMPLER},
        },
        SearchSpec,
    )
    assert spec.checkpoints.format == "files" and spec.sampler.target == DIFFUSERS_SAMPLER


def test_cli_validate_refuses_mnist_sampler_under_diffusers(tmp_path):
    """`lcsc-ray validate` exits 2 for a diffusers spec with the MNIST sampler, naming `sampler.target`."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_diffusers(sampler={"target": MNIST_SAMPLER, "nfe": 4})))
    result = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "sampler.target" in result.stderr and "OK" not in result.stdout


# ------------------------------------------------------------------------------------------------ budget


def test_budget_below_the_seeds_of_any_set_is_refused_by_the_schema():
    """Budget 2 with decays [0.5, 0.8] is below even two checkpoints' 3 seeds: refused at `search.budget`."""
    with pytest.raises(SpecError) as info:
        parse_spec({"search": {"budget": 2, "ema_decays": [0.5, 0.8]}}, SearchSpec)
    assert "search.budget" in str(info.value) and "at least 3" in str(info.value)
    assert parse_spec({"search": {"budget": 3, "ema_decays": [0.5, 0.8]}}, SearchSpec).search.budget == 3


def _files_spec(tmp_path: Path, budget: int, **extra) -> SearchSpec:
    write_run(tmp_path / "ckpts", num=5)
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {"stats_uri": None},
            },
            "search": {"budget": budget, "ema_decays": [0.5, 0.8]},
            "output": {"uri": str(tmp_path / "out")},
            **extra,
        }
    )


def test_budget_below_the_seeds_of_the_listed_set_is_refused_at_preflight(tmp_path):
    """Five checkpoints give 4 seeds (last, ema@0.5, ema@0.8, uniform): budget 3 is refused, 4 passes."""
    with pytest.raises(SpecError) as info:
        preflight(_files_spec(tmp_path, budget=3))
    message = str(info.value)
    assert "`search.budget` (3)" in message and "at least 4" in message and "uniform" in message
    assert [step for _, step in preflight(_files_spec(tmp_path, budget=4))] == [100, 200, 300, 400, 500]


def test_posthoc_ema_seed_counts_towards_the_budget(tmp_path):
    """With `posthoc_ema` the post-hoc EMA seed needs a place too: 4 is refused, asking for 5."""
    spec = _files_spec(tmp_path, budget=4, posthoc_ema={"uri": str(tmp_path / "phema")})
    with pytest.raises(SpecError, match=r"at least 5"):
        preflight(spec)


def test_cli_validate_refuses_budget_against_listed_checkpoints(tmp_path):
    """`lcsc-ray validate` lists reachable checkpoints and refuses a budget below their seeds (exit 2)."""
    spec = _files_spec(tmp_path, budget=3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    result = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "search.budget" in result.stderr and "at least 4" in result.stderr
