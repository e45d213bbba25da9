"""Checkpoint sets: listing by step, reading once, validation errors, object-store budget, local and S3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lcsc_ray import checkpoints
from lcsc_ray.checkpoints import (
    Layout,
    check_fits,
    list_checkpoints,
    load_checkpoint_set,
    read_state_dict,
)
from rayops import storage
from schemas.errors import CheckpointError
from schemas.search import CheckpointSetSpec
from tests.lcsc_plugins import trajectory, write_run


def test_layout_roundtrip_views():
    """flatten/unflatten round-trips every tensor, and unflatten returns views of the flat array."""
    state = trajectory(1)[0]
    layout = Layout.from_state_dict(state)
    flat = layout.flatten(state)
    assert flat.dtype == np.float32 and flat.size == sum(t.numel() for t in state.values())
    views = layout.unflatten(flat)
    for name, tensor in state.items():
        torch.testing.assert_close(views[name], tensor.float())
    views["conv1.weight"].fill_(7.0)
    assert flat[layout.offsets[layout.names.index("conv1.weight")]] == 7.0


def test_layout_bf16_storage():
    """bfloat16 storage halves the bytes and keeps values to bf16 precision."""
    state = trajectory(1)[0]
    layout = Layout.from_state_dict(state, "bfloat16")
    flat = layout.flatten(state)
    assert flat.dtype == np.uint16 and layout.nbytes == 2 * flat.size
    back = layout.unflatten(flat)["conv2.weight"].float()
    torch.testing.assert_close(back, state["conv2.weight"], rtol=1e-2, atol=1e-2)


def test_list_orders_by_metadata_step_and_applies_last(tmp_path):
    """Order comes from the 'step' metadata, not the name; `last` keeps the newest."""
    paths = write_run(tmp_path, num=4, steps=[300, 20, 1000, 5])
    (tmp_path / "ckpt-000020.safetensors").rename(tmp_path / "z-first.safetensors")  # name digits gone
    order = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path)))
    assert [step for _, step in order] == [5, 20, 300, 1000]
    assert order[1][0].endswith("z-first.safetensors")
    assert [s for _, s in list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), last=2))] == [300, 1000]
    assert len(paths) == 4


def test_list_orders_torch_files_by_name_digits(tmp_path):
    """Torch files are ordered by the digits in their names (numerically, not lexically)."""
    for step in (900, 1000, 80):
        torch.save({"model": trajectory(1)[0]}, tmp_path / f"step{step}.pt")
    order = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), glob="*.pt"))
    assert [s for _, s in order] == [80, 900, 1000]


def test_read_torch_with_key_and_wrong_key(tmp_path):
    """`key` selects the state dict inside a dict; a wrong key lists the available ones."""
    state = trajectory(1)[0]
    torch.save({"model": state, "step": 5}, tmp_path / "c.pt")
    loaded = read_state_dict(str(tmp_path / "c.pt"), key="model")
    torch.testing.assert_close(loaded["conv1.bias"], state["conv1.bias"])
    with pytest.raises(CheckpointError, match=r"c\.pt has no key 'ema'.*model"):
        read_state_dict(str(tmp_path / "c.pt"), key="ema")
    with pytest.raises(CheckpointError, match="set `checkpoints.key`"):
        read_state_dict(str(tmp_path / "c.pt"))


def test_bad_files_are_named(tmp_path):
    """Truncated, unreadable, missing and NaN checkpoints each give an error naming the file (and tensor)."""
    path = write_run(tmp_path, num=1)[0]
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is truncated"):
        read_state_dict(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pt cannot be read"):
        read_state_dict(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors does not exist"):
        read_state_dict(str(tmp_path / "nothere.safetensors"))
    state = trajectory(1)[0]
    state["conv2.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: tensor 'conv2.bias' holds 1 NaN"):
        read_state_dict(str(tmp_path / "nan.safetensors"))


def test_set_reads_each_file_once_and_puts_flat_arrays(tmp_path, ray_local, monkeypatch):
    """Loading reads every file exactly once and puts one flat array per checkpoint, in step order."""
    write_run(tmp_path / "run", num=3, steps=[30, 10, 20])
    states = trajectory(3)  # written in that order: steps 30, 10, 20
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real_read(uri))
    cset = load_checkpoint_set(CheckpointSetSpec(uri=str(tmp_path / "run")))
    assert sorted(reads) == sorted(cset.uris) and len(reads) == 3
    assert cset.steps == [10, 20, 30] and len(cset.refs) == 3
    first = ray_local.get(cset.refs[0])
    expected = cset.layout.flatten(states[1])
    assert np.array_equal(first, expected) and not first.flags.writeable
    assert cset.nbytes == 3 * expected.nbytes


def test_set_mismatch_names_file_and_tensor(tmp_path, ray_local):
    """A checkpoint with a different shape is refused, naming the file and the first offending tensor."""
    write_run(tmp_path, num=2)
    state = trajectory(1, channels=5)[0]
    save_file(state, str(tmp_path / "ckpt-000900.safetensors"), metadata={"step": "900"})
    with pytest.raises(
        CheckpointError,
        match=r"ckpt-000900\.safetensors does not match .*ckpt-000100.*'conv1.bias' has shape \(5,\)",
    ):
        load_checkpoint_set(CheckpointSetSpec(uri=str(tmp_path)))


def test_set_too_big_fails_before_reading(tmp_path, ray_local, monkeypatch):
    """A set larger than the object store placed on `node` fails before any file is read, naming sizes and
    options (`auto` would stream it instead)."""
    save_file({"w": torch.zeros(16_000_000)}, str(tmp_path / "big.safetensors"))  # 64 MB
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"read {uri}"))
    spec = CheckpointSetSpec(uri=str(tmp_path), paths=["big.safetensors"] * 20, placement="node")
    with pytest.raises(
        CheckpointError, match=r"20 checkpoints need 1\.19 GiB of object store.*bfloat16.*last.*bigger"
    ):
        load_checkpoint_set(spec)


def test_check_fits_pure():
    """The budget check passes under 90% of capacity and fails above it."""
    check_fits(899, 1000, 2, "float32")
    with pytest.raises(CheckpointError, match="bfloat16"):
        check_fits(901, 1000, 2, "float32")


def test_set_from_seaweedfs_with_ema(tmp_path, s3_bucket, ray_local):
    """A set on a real S3 server (SeaweedFS) loads in step order, with the run's EMA beside it."""
    paths = write_run(tmp_path, num=3, steps=[7, 3, 5])
    for path in paths:
        storage.upload_file(path, f"{s3_bucket}/run/{path.name}")
    ema_state = trajectory(1, seed=9)[0]
    torch.save({"ema": ema_state}, tmp_path / "ema.pt")
    storage.upload_file(tmp_path / "ema.pt", f"{s3_bucket}/ema.pt")
    spec = CheckpointSetSpec(uri=f"{s3_bucket}/run", ema_uri=f"{s3_bucket}/ema.pt", ema_key="ema")
    cset = load_checkpoint_set(spec)
    assert cset.steps == [3, 5, 7] and cset.names[0] == "ckpt-000003.safetensors"
    assert np.array_equal(ray_local.get(cset.ema_ref), cset.layout.flatten(ema_state))
    assert checkpoints.list_checkpoints(spec)[0][0] == f"{s3_bucket}/run/ckpt-000003.safetensors"
