"""Checkpoint files of the recipes: safetensors weights with string metadata, and the resumable training
state (torch.save of tensors and plain values, read back with weights_only=True). Every file is written
atomically through `rayops.storage` (local: temporary file + os.replace; S3: one PUT)."""

from __future__ import annotations

import io
import json
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from rayops import storage
from schemas.errors import CheckpointError

FORMAT = "lcsc-ray-recipe/1"
CKPT_PATTERN = re.compile(r"ckpt_(\d{6,})\.safetensors$")


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint saved at `step`: ckpt_{step:06d}.safetensors."""
    return f"ckpt_{step:06d}.safetensors"


def save_weights(uri: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a state dict as safetensors (contiguous CPU copies) with string metadata, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    storage.write_bytes(uri, save_safetensors_bytes(tensors, metadata={"format": FORMAT, **metadata}))


def read_metadata(data: bytes, uri: str) -> dict[str, str]:
    """The string metadata in the header of safetensors bytes."""
    try:
        (header_len,) = torch.frombuffer(bytearray(data[:8]), dtype=torch.int64).tolist()
        return json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{uri}: not a safetensors file ({exc}); re-save it or remove it") from None


def load_weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file at a local path or URI."""
    data = storage.read_bytes(uri)
    try:
        tensors = load_safetensors_bytes(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{uri}: unreadable safetensors file ({exc}); it may be truncated") from exc
    return tensors, read_metadata(data, uri)


def model_kwargs_of(metadata: dict[str, str], uri: str) -> dict:
    """The U-Net keyword arguments a checkpoint's metadata records."""
    if "model_kwargs" not in metadata:
        raise CheckpointError(f"{uri}: no 'model_kwargs' in the metadata; was it written by a recipe?")
    return json.loads(metadata["model_kwargs"])


def list_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, uri) of every ckpt_XXXXXX.safetensors under `checkpoint_dir`, by step."""
    found = []
    for uri in storage.list_uris(checkpoint_dir, pattern="ckpt_*.safetensors", recursive=False):
        match = CKPT_PATTERN.search(uri)
        if match:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def save_training_state(uri: str, state: dict) -> None:
    """Write the resumable training state (modules' state dicts, optimizer, step, RNG) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def load_training_state(uri: str) -> dict:
    """Read a training state written by `save_training_state` (weights_only=True: tensors and plain data)."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{uri}: unreadable training state ({exc}); delete it to restart from step 0"
        ) from exc


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], uri: str) -> nn.Module:
    """Load weights strictly, with an error that names the file and the differing keys."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    bad_shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{uri} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad_shapes[:5]}; build the model with the checkpoint's model_kwargs"
        )
    model.load_state_dict(state_dict)
    return model
