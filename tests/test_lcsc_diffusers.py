"""LCSC on diffusers checkpoints: the reader, the model builder, the scheduler sampler, the export, a search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lcsc_ray.checkpoints import list_checkpoints, load_checkpoint_set, read_state_dict
from lcsc_ray.diffusers_checkpoints import build_model, diffusers_model_files
from lcsc_ray.diffusers_sampling import make_scheduler, sample
from lcsc_ray.export import combined_safetensors
from schemas.errors import CheckpointError
from schemas.search import CheckpointSetSpec, SearchSpec
from tests.lcsc_plugins import reference_images

STEPS, EVERY, TRAIN_TIMESTEPS = 12, 4, 100


def tiny_unet():
    """A 41k-parameter UNet2DModel for 1x8x8 images."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def train_run(root: Path, steps: int = STEPS, every: int = EVERY) -> dict[int, dict[str, torch.Tensor]]:
    """Train the tiny UNet with diffusers' DDPMScheduler and save as `train_unconditional.py` does: every
    `every` steps `checkpoint-N/unet` and `checkpoint-N/unet_ema` (its accelerate save hooks) beside
    accelerate's optimizer state, then the final `scheduler/`. Returns step -> the saved weights."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model, noise_scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    ema = EMAModel(model.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, saved = reference_images(64), {}
    for step in range(1, steps + 1):
        clean = data[torch.randint(0, len(data), (16,))]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (16,))
        loss = torch.nn.functional.mse_loss(
            model(noise_scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())
        if step % every == 0:
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder / "unet")
            ema.save_pretrained(str(folder / "unet_ema"))
            torch.save(optimizer.state_dict(), folder / "optimizer.bin")  # accelerate's other files
            saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noise_scheduler.save_pretrained(root / "scheduler")
    return saved


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny diffusers training run shared by this module's tests."""
    root = tmp_path_factory.mktemp("diffusers") / "ddpm-run"
    return root, train_run(root)


def test_reader_orders_folders_by_step_and_reads_the_unet(run):
    """checkpoint-4, -8, -12 come in step order (not name order) with the weights each saved."""
    root, saved = run
    spec = CheckpointSetSpec(uri=str(root), format="diffusers")
    listed = list_checkpoints(spec)
    assert [step for _, step in listed] == [4, 8, 12]
    assert listed[0][0] == f"{root}/checkpoint-4/unet/diffusion_pytorch_model.safetensors"
    state = read_state_dict(listed[1][0])
    assert set(state) == set(saved[8])
    for name, tensor in saved[8].items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    ema = CheckpointSetSpec(uri=str(root), format="diffusers", subfolder="unet_ema")
    ema_first = read_state_dict(list_checkpoints(ema)[0][0])
    assert not torch.equal(ema_first["conv_in.weight"], saved[4]["conv_in.weight"])  # the EMA, not the model


def test_reader_accelerate_layout_and_refusals(run, tmp_path):
    """accelerate's model.safetensors is read; a checkpoint folder without weights is refused by name."""
    from safetensors.torch import save_file

    _, saved = run
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(saved[4 * (step // 3)], str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    listed = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), format="diffusers"))
    assert [step for _, step in listed] == [3, 6]
    assert listed[1][0].endswith("checkpoint-6/model.safetensors")
    (tmp_path / "checkpoint-9" / "unet").mkdir(parents=True)
    (tmp_path / "checkpoint-9" / "unet" / "config.json").write_text("{}")  # a save cut short
    with pytest.raises(CheckpointError, match=r"checkpoint-9 holds neither unet/diffusion_pytorch_model"):
        list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), format="diffusers"))
    with pytest.raises(CheckpointError, match=r"no `checkpoint-N` folders"):
        list_checkpoints(CheckpointSetSpec(uri=str(tmp_path / "checkpoint-3"), format="diffusers"))


def test_builder_reads_config_and_the_runs_scheduler(run):
    """The model is built from the saved config; the run's DDPM scheduler config rides along."""
    root, saved = run
    model = build_model(str(root))
    assert type(model).__name__ == "UNet2DModel" and list(model.config.block_out_channels) == [8, 16]
    assert set(model.state_dict()) == set(saved[12])
    assert model.lcsc_scheduler_config["num_train_timesteps"] == TRAIN_TIMESTEPS
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(root), "format": "diffusers"},
            "output": {"uri": str(root.parent / "out")},
        }
    )
    assert spec.model.target == "lcsc_ray.diffusers_checkpoints:build_model"
    assert spec.sampler.target == "lcsc_ray.diffusers_sampling:sample"


def _trained(root: Path, saved: dict):
    model = build_model(str(root))
    model.load_state_dict(saved[12])
    return model.eval()


def test_ddim_sampler_matches_diffusers_pipeline(run):
    """Our DDIM samples equal DDIMPipeline's for the same generator seed (an independent loop)."""
    from diffusers import DDIMPipeline

    root, saved = run
    model = _trained(root, saved)
    ours = sample(model, 6, seed=5, nfe=5, batch_size=6, scheduler="DDIM")
    scheduler = make_scheduler("DDIM", model.lcsc_scheduler_config)
    assert scheduler.config.num_train_timesteps == TRAIN_TIMESTEPS
    pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    theirs = pipe(
        batch_size=6,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=5,
        eta=0.0,
        output_type="np",
    ).images  # (B, H, W, C) in [0, 1]
    np.testing.assert_allclose((ours.numpy() / 2 + 0.5).transpose(0, 2, 3, 1), theirs, atol=1e-5)
    smaller_batches = sample(model, 6, seed=5, nfe=5, batch_size=4, scheduler="DDIM")
    torch.testing.assert_close(smaller_batches, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(sample(model, 6, seed=6, nfe=5, batch_size=6), ours)


def test_consistency_and_other_schedulers(run):
    """CMStochasticIterative matches ConsistencyModelPipeline; DPM-Solver and Euler give finite [-1, 1] images."""
    from diffusers import ConsistencyModelPipeline

    root, saved = run
    model = _trained(root, saved)
    ours = sample(model, 3, seed=2, nfe=2, batch_size=3, scheduler="CMStochasticIterative")
    pipe = ConsistencyModelPipeline(
        unet=model, scheduler=make_scheduler("CMStochasticIterative", model.lcsc_scheduler_config)
    )
    theirs = pipe(
        batch_size=3, num_inference_steps=2, generator=torch.Generator().manual_seed(2), output_type="np"
    ).images
    np.testing.assert_allclose((ours.numpy() / 2 + 0.5).transpose(0, 2, 3, 1), theirs, atol=1e-5)
    for name in ("DPMSolverMultistep", "Euler"):
        images = sample(model, 3, seed=0, nfe=3, batch_size=3, scheduler=name)
        assert images.shape == (3, 1, 8, 8) and bool(torch.isfinite(images).all()) and images.abs().max() <= 1
    with pytest.raises(Exception, match="choose one of"):
        sample(model, 1, 0, 1, 1, scheduler="PNDM")


def test_export_is_a_folder_from_pretrained_loads(run):
    """The combined weights, written as a diffusers folder, load with UNet2DModel.from_pretrained."""
    from diffusers import UNet2DModel

    root, saved = run
    spec = CheckpointSetSpec(uri=str(root), format="diffusers")
    alphas = [0.2, 0.3, 0.5]
    combined, sidecar = combined_safetensors(spec, alphas)
    assert sidecar["steps"] == [4, 8, 12]
    files = diffusers_model_files(spec, combined)
    out = root.parent / "export"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    loaded = UNet2DModel.from_pretrained(out / "diffusers" / "unet")
    expected = sum(a * saved[s]["conv_in.weight"] for a, s in zip(alphas, (4, 8, 12)))
    torch.testing.assert_close(loaded.state_dict()["conv_in.weight"], expected, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "diffusers/unet/config.json").read_text())["_class_name"] == "UNet2DModel"


def test_checkpoint_set_names_and_ema_folder(ray_local, run):
    """The object-store set names checkpoints by folder and takes a `unet_ema` folder as the run's EMA."""
    root, _ = run
    spec = CheckpointSetSpec(
        uri=str(root), format="diffusers", last=2, ema_uri=str(root / "checkpoint-12/unet_ema")
    )
    loaded = load_checkpoint_set(spec)
    assert loaded.names == ["checkpoint-8/unet", "checkpoint-12/unet"] and loaded.steps == [8, 12]
    ema = load_file(str(root / "checkpoint-12/unet_ema/diffusion_pytorch_model.safetensors"))
    flat = ray_local.get(loaded.ema_ref)
    assert np.array_equal(flat, loaded.layout.flatten(ema))


def test_example_spec_loads_and_round_trips():
    """examples/search_diffusers.yaml is a valid spec naming the diffusers built-ins; load-dump-load is stable."""
    from schemas.loader import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "search_diffusers.yaml")
    assert spec.checkpoints.format == "diffusers" and spec.sampler.kwargs["scheduler"] == "DDIM"
    assert spec.fid.features.target == "lcsc_ray.inception:fid_inception_v3"
    assert SearchSpec.model_validate(spec.model_dump()) == spec
