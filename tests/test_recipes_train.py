"""MNIST recipe training: checkpoint files, exact resume after an interruption, Ray task, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lcsc_ray.recipes import checkpoints as ckpt
from lcsc_ray.recipes.mnist import build_consistency_model, build_unet, train_consistency, train_ddpm
from lcsc_ray.recipes.training import TrainingInterrupted
from schemas.errors import CheckpointError

TINY_MODEL = {"channels": [8, 16], "emb_dim": 16, "groups": 4, "attention": False}
TINY = {
    "steps": 6,
    "batch_size": 8,
    "checkpoint_every": 2,
    "warmup_steps": 2,
    "model": TINY_MODEL,
    "grid_samples": 4,
    "grid_nfe": 2,
    "progress_interval_s": 60,
}


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory) -> str:
    """A finished 6-step DDPM run with the tiny U-Net; returns its output directory."""
    out = str(tmp_path_factory.mktemp("ddpm") / "run")
    train_ddpm({**TINY, "out": out})
    return out


def _weights(uri: str) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(uri)[0]


def test_checkpoints_have_step_metadata_and_identical_keys(tiny_ddpm):
    """Every checkpoint_every steps a ckpt file appears with its step in the metadata and the skeleton's keys."""
    found = ckpt.list_checkpoints(f"{tiny_ddpm}/checkpoints")
    assert [step for step, _ in found] == [2, 4, 6]
    skeleton = build_unet(**TINY_MODEL).state_dict()
    for step, uri in found:
        tensors, metadata = ckpt.load_weights(uri)
        assert metadata["step"] == str(step) and metadata["kind"] == "ddpm"
        assert json.loads(metadata["model_kwargs"])["channels"] == [8, 16]
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in skeleton.items()}
    ema, ema_meta = ckpt.load_weights(f"{tiny_ddpm}/ema.safetensors")
    assert ema.keys() == skeleton.keys() and ema_meta["step"] == "6"
    assert not torch.equal(ema["conv_in.weight"], _weights(found[-1][1])["conv_in.weight"])
    with open(f"{tiny_ddpm}/samples.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(Path(f"{tiny_ddpm}/summary.json").read_text())
    assert summary["steps"] == 6 and summary["num_checkpoints"] == 3


def test_resume_after_interruption_matches_unbroken_run(tiny_ddpm, tmp_path):
    """A run stopped after step 3 resumes from its step-2 checkpoint and ends bit-identical to an unbroken run."""
    out = str(tmp_path / "broken")
    with pytest.raises(TrainingInterrupted):
        train_ddpm({**TINY, "out": out}, stop_after=3)
    assert [s for s, _ in ckpt.list_checkpoints(f"{out}/checkpoints")] == [2]
    summary = train_ddpm({**TINY, "out": out})
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    assert [s for s, _ in ckpt.list_checkpoints(f"{out}/checkpoints")] == [2, 4, 6]
    for name in ("checkpoints/ckpt_000006.safetensors", "ema.safetensors"):
        resumed, unbroken = _weights(f"{out}/{name}"), _weights(f"{tiny_ddpm}/{name}")
        assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken), name


def test_resume_refuses_a_different_model(tmp_path):
    """Resuming with other model settings is an error that names the state file, not a silent restart."""
    out = str(tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        train_ddpm({**TINY, "out": out}, stop_after=2)
    with pytest.raises(CheckpointError, match="train_state.pt"):
        train_ddpm({**TINY, "out": out, "model": {**TINY_MODEL, "channels": [8, 24]}})


def test_consistency_distillation_checkpoints_and_resume(tiny_ddpm, tmp_path):
    """CD from the tiny DDPM saves CM checkpoints with the skeleton's keys and resumes to the same weights."""
    config = {**TINY, "teacher_uri": f"{tiny_ddpm}/ema.safetensors", "steps": 4, "grid_nfe": 1}
    unbroken = train_consistency({**config, "out": str(tmp_path / "a")})
    assert unbroken["steps"] == 4
    with pytest.raises(TrainingInterrupted):
        train_consistency({**config, "out": str(tmp_path / "b")}, stop_after=3)
    assert train_consistency({**config, "out": str(tmp_path / "b")})["resumed_from"] == 2
    skeleton = build_consistency_model(**TINY_MODEL).state_dict()
    a = _weights(str(tmp_path / "a/checkpoints/ckpt_000004.safetensors"))
    b = _weights(str(tmp_path / "b/checkpoints/ckpt_000004.safetensors"))
    assert a.keys() == skeleton.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher = _weights(f"{tiny_ddpm}/ema.safetensors")
    assert not torch.equal(a["unet.conv_in.weight"], teacher["conv_in.weight"])  # the student moved


def test_train_on_ray_runs_as_a_task(ray_local, tmp_path):
    """train_on_ray trains in a Ray worker process with one torch thread per CPU it was given (not the
    driver's OMP_NUM_THREADS=1) and returns the summary; the files land in `out`."""
    from lcsc_ray.recipes.train import train_on_ray

    summary = train_on_ray(
        "ddpm", {**TINY, "steps": 2, "grid_samples": 0, "out": str(tmp_path / "ray")}, num_cpus=2
    )
    assert summary["steps"] == 2
    assert summary["torch_threads"] == 2
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "ray/checkpoints"))] == [2]


def test_cli_train_ddpm_local(tmp_path):
    """`lcsc-ray recipe train-ddpm --local` trains and prints the JSON summary."""
    from lcsc_ray.cli import main

    out = str(tmp_path / "cli")
    args = [
        "recipe",
        "train-ddpm",
        "--local",
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        "--model-json",
        json.dumps(TINY_MODEL),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    assert [s for s, _ in ckpt.list_checkpoints(f"{out}/checkpoints")] == [1, 2]


def test_resume_after_sigkill_of_the_training_process(tmp_path):
    """A training process killed with SIGKILL resumes from its last checkpoint and matches an unbroken run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "lcsc_ray.recipes",
        "train-ddpm",
        "--local",
        "--out",
        str(out),
        "--steps",
        "100000",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "5",
        "--model-json",
        json.dumps(TINY_MODEL),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / "train_state.pt").exists(), "the training process never saved a state"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = ckpt.list_checkpoints(str(out / "checkpoints"))[-1][0]
    config = {
        "steps": killed_at + 3,
        "batch_size": 8,
        "checkpoint_every": 5,
        "model": TINY_MODEL,
        "grid_samples": 0,
    }  # what the command line set; the rest are defaults on both sides
    summary = train_ddpm({**config, "out": str(out)})
    assert summary["resumed_from"] >= killed_at - 5 and summary["steps"] == killed_at + 3
    train_ddpm({**config, "out": str(tmp_path / "unbroken")})
    final = ckpt.checkpoint_name(killed_at + 3)
    resumed, unbroken = (
        _weights(str(out / "checkpoints" / final)),
        _weights(str(tmp_path / "unbroken" / "checkpoints" / final)),
    )
    assert all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


def test_training_writes_and_resumes_on_s3(s3_bucket):
    """Checkpoints, EMA and the training state go to an s3:// URI, and an interrupted run resumes from there."""
    out = f"{s3_bucket}/runs/ddpm"
    config = {**TINY, "steps": 4, "grid_samples": 0, "out": out}
    with pytest.raises(TrainingInterrupted):
        train_ddpm(config, stop_after=3)
    assert [s for s, _ in ckpt.list_checkpoints(f"{out}/checkpoints")] == [2]
    summary = train_ddpm(config)
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    assert [s for s, _ in ckpt.list_checkpoints(f"{out}/checkpoints")] == [2, 4]
    assert ckpt.load_weights(f"{out}/ema.safetensors")[1]["step"] == "4"
