"""diffusers plug-ins refuse what they would otherwise silently get wrong: a missing EMA folder, unknown
scheduler keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lcsc_ray.checkpoints import list_checkpoints
from lcsc_ray.diffusers_sampling import make_scheduler
from schemas.errors import CheckpointError, SpecError
from schemas.search import CheckpointSetSpec

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _weights(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2,), value)}, str(path))


def _accelerate_run(root: Path, ema_at: tuple[int, ...]) -> None:
    """checkpoint-1..3, each with accelerate's (non-EMA) model.safetensors and unet/; unet_ema/ only at `ema_at`."""
    for step in (1, 2, 3):
        folder = root / f"checkpoint-{step}"
        _weights(folder / "model.safetensors", float(step))
        _weights(folder / "unet" / WEIGHTS, float(step))
        if step in ema_at:
            _weights(folder / "unet_ema" / WEIGHTS, 10.0 + step)


def test_ema_subfolder_missing_is_refused_not_replaced_by_the_model(tmp_path):
    """With `subfolder: unet_ema`, a folder without the EMA is refused by name, listing the subfolders it has."""
    _accelerate_run(tmp_path, ema_at=(1, 3))
    spec = CheckpointSetSpec(uri=str(tmp_path), format="diffusers", subfolder="unet_ema")
    with pytest.raises(CheckpointError) as info:
        list_checkpoints(spec)
    message = str(info.value)
    assert f"{tmp_path}/checkpoint-2" in message and "unet_ema" in message
    assert "subfolders: unet" in message and "checkpoints.subfolder" in message


def test_ema_subfolder_missing_under_explicit_paths_is_refused(tmp_path):
    """`checkpoints.paths` naming a folder without the EMA is refused too, never read as the non-EMA model."""
    _accelerate_run(tmp_path, ema_at=(1, 3))
    spec = CheckpointSetSpec(
        uri=str(tmp_path), format="diffusers", subfolder="unet_ema", paths=["checkpoint-1", "checkpoint-2"]
    )
    with pytest.raises(CheckpointError, match=r"checkpoint-2 .*unet_ema.*subfolders: unet"):
        list_checkpoints(spec)


def test_ema_subfolder_present_everywhere_reads_the_ema(tmp_path):
    """When every folder holds the EMA, the EMA files are what is listed."""
    _accelerate_run(tmp_path, ema_at=(1, 2, 3))
    spec = CheckpointSetSpec(uri=str(tmp_path), format="diffusers", subfolder="unet_ema")
    assert [uri for uri, _ in list_checkpoints(spec)] == [
        f"{tmp_path}/checkpoint-{s}/unet_ema/{WEIGHTS}" for s in (1, 2, 3)
    ]


def test_model_subfolder_still_falls_back_to_accelerates_save(tmp_path):
    """The model's own subfolder may still fall back to accelerate's model.safetensors (the same weights)."""
    (tmp_path / "checkpoint-1").mkdir()
    _weights(tmp_path / "checkpoint-1" / "model.safetensors", 1.0)
    _weights(tmp_path / "checkpoint-2" / "model.safetensors", 2.0)
    listed = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), format="diffusers"))
    assert [uri for uri, _ in listed] == [f"{tmp_path}/checkpoint-{s}/model.safetensors" for s in (1, 2)]


def test_unknown_scheduler_kwarg_is_refused_naming_the_accepted_ones():
    """A misspelt `scheduler_kwargs` key is refused, naming it and the scheduler's accepted keys."""
    with pytest.raises(SpecError) as info:
        make_scheduler("DDIM", None, {"timestep_spacingg": "trailing"})
    message = str(info.value)
    assert "'timestep_spacingg'" in message and "DDIMScheduler" in message
    assert "timestep_spacing" in message.split("accepts", 1)[1] and "_use_default_values" not in message


def test_known_scheduler_kwargs_apply_and_training_config_extras_are_dropped():
    """A known override applies; keys of the run's training config another scheduler lacks are still dropped."""
    training_config = {"num_train_timesteps": 50, "variance_type": "fixed_small"}  # DDPMScheduler's keys
    scheduler = make_scheduler("DDIM", training_config, {"timestep_spacing": "trailing"})
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.num_train_timesteps == 50
    assert "variance_type" not in scheduler.config


def test_validate_refuses_unknown_scheduler_kwarg_before_any_sampling(tmp_path):
    """`lcsc-ray validate` refuses a misspelt `scheduler_kwargs` key of the diffusers sampler (exit 2), naming it."""
    import subprocess
    import sys

    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "checkpoints": {"uri": str(tmp_path / "run"), "format": "diffusers"},
                "output": {"uri": str(tmp_path / "o")},
                "sampler": {
                    "kwargs": {"scheduler": "Euler", "scheduler_kwargs": {"timestep_spacingg": "trailing"}}
                },
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
        timeout=180,
    )
    assert result.returncode == 2, result.stdout
    assert "'timestep_spacingg'" in result.stderr and "EulerDiscreteScheduler" in result.stderr


def test_preflight_refuses_unknown_scheduler_kwarg(tmp_path):
    """The search's preflight refuses the same key before any checkpoint is read into Ray."""
    from lcsc_ray.run_identity import preflight
    from schemas.search import SearchSpec

    _accelerate_run(tmp_path / "run", ema_at=())
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "run"), "format": "diffusers"},
            "output": {"uri": str(tmp_path / "o")},
            "fid": {"features": {"target": "tests.lcsc_plugins:tiny_features"}},
            "sampler": {"kwargs": {"scheduler_kwargs": {"bogus": 1}}},
        }
    )
    with pytest.raises(SpecError, match=r"'bogus'.*DDIMScheduler accepts"):
        preflight(spec)
