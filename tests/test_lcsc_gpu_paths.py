"""Evaluator device and precision selection, tested on the CPU (no GPU is claimed to have run here)."""

from __future__ import annotations

import pytest
import torch

from lcsc_ray.checkpoints import load_checkpoint_set
from lcsc_ray.evaluator import Evaluator, sampling_precision, select_device
from lcsc_ray.fid import reference_stats_for
from schemas.errors import SpecError
from schemas.search import SearchSpec
from tests import lcsc_plugins


def test_device_follows_num_gpus_and_ray_assignment():
    """No GPUs: the CPU; GPUs under Ray's CUDA_VISIBLE_DEVICES: cuda:0; without it: the assigned id."""
    assert select_device(0, [], True, None) == torch.device("cpu")
    assert select_device(0.5, ["3"], True, "3") == torch.device("cuda", 0)
    assert select_device(1, ["3"], True, None) == torch.device("cuda", 3)
    assert select_device(1, [], True, None) == torch.device("cuda", 0)


def test_gpu_asked_without_cuda_names_the_field():
    """Asking for a GPU where torch has no CUDA is an error naming `evaluators.num_gpus`, not a silent CPU run."""
    with pytest.raises(SpecError, match=r"`evaluators.num_gpus` is 1.*num_gpus: 0"):
        select_device(1, ["0"], False, "0")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_autocasts_on_cpu(dtype):
    """float16/bfloat16 sampling runs matmuls in that dtype under autocast; float32 leaves them alone."""
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    with sampling_precision(torch.device("cpu"), name):
        assert (a @ b).dtype == dtype
    with sampling_precision(torch.device("cpu"), "float32"):
        assert (a @ b).dtype == torch.float32


def test_bfloat16_evaluation_on_cpu(tmp_path, ray_local):
    """An evaluator with `evaluators.dtype: bfloat16` samples in bf16: its FID moves a little, not a lot."""
    lcsc_plugins.write_run(tmp_path / "ckpts", num=3)
    spec = {
        "checkpoints": {"uri": str(tmp_path / "ckpts")},
        "model": {"target": "tests.lcsc_plugins:build_tiny"},
        "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
        "fid": {
            "features": {"target": "tests.lcsc_plugins:tiny_features"},
            "reference": {"dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}},
        },
        "evaluators": {"batch_size": 32},
        "output": {"uri": str(tmp_path / "out")},
    }
    fids = {}
    for dtype in ("float32", "bfloat16"):
        search = SearchSpec.model_validate({**spec, "evaluators": {"batch_size": 32, "dtype": dtype}})
        checkpoint_set = load_checkpoint_set(search.checkpoints)
        mu, sigma = reference_stats_for(search)
        evaluator = Evaluator(search, checkpoint_set, reference_mu=mu, reference_sigma=sigma)
        assert evaluator.device == torch.device("cpu")
        fids[dtype] = evaluator.evaluate([0.2, 0.3, 0.5], 64, 4)["fid"]
    assert fids["bfloat16"] != fids["float32"]
    assert fids["bfloat16"] == pytest.approx(fids["float32"], rel=0.05)
