"""An LCSC search over a diffusers training run's checkpoints, end to end, out to a diffusers model folder."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lcsc_ray.search import run_search
from schemas.search import SearchSpec
from tests.test_lcsc_diffusers import train_run


@pytest.mark.timeout(600)
def test_search_over_diffusers_checkpoints(ray_local, tmp_path):
    """A search reads checkpoint-N folders in step order, uses the unet_ema baseline and exports a loadable folder."""
    from diffusers import UNet2DModel

    root = tmp_path / "ddpm-run"
    saved = train_run(root)
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {
                "uri": str(root),
                "format": "diffusers",
                "ema_uri": str(root / "checkpoint-12" / "unet_ema"),
            },
            "sampler": {
                "target": "lcsc_ray.diffusers_sampling:sample",
                "nfe": 2,
                "kwargs": {"scheduler": "DDIM"},
            },
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 32,
                "holdout_seeds": [11, 12],
            },
            "evaluators": {"num_actors": 1, "batch_size": 32, "num_cpus": 0.5},
            "search": {"budget": 5, "ema_decays": [0.5]},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    assert spec.model.kwargs == {"config_uri": str(root), "subfolder": "unet"}  # the built-in, filled in
    result = run_search(spec)
    assert result.checkpoint_steps == [4, 8, 12]
    assert result.checkpoint_names == ["checkpoint-4/unet", "checkpoint-8/unet", "checkpoint-12/unet"]
    assert "run-ema" in {b.label for b in result.baselines}
    folder = tmp_path / "out" / "diffusers" / "unet"
    assert result.files["diffusers/unet/config.json"].endswith("diffusers/unet/config.json")
    loaded = UNet2DModel.from_pretrained(folder)
    combined = load_file(tmp_path / "out" / "combined.safetensors")
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, combined[name], rtol=0, atol=0)
    alphas = result.best.coefficients
    expected = sum(a * saved[s]["conv_in.weight"].double() for a, s in zip(alphas, (4, 8, 12)))
    torch.testing.assert_close(combined["conv_in.weight"].double(), expected, rtol=1e-5, atol=1e-6)
