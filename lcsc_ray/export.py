"""Apply known coefficients to a checkpoint set without Ray, streaming one checkpoint at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from lcsc_ray.checkpoints import list_checkpoints, read_state_dict
from lcsc_ray.combine import check_coefficients
from rayops import artifacts, storage
from schemas.errors import SpecError
from schemas.search import CheckpointSetSpec


def read_coefficients(uri: str) -> list[float]:
    """Coefficients from a JSON list, a `combined.json` sidecar or a search's `result.json`."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise SpecError(f"{uri} is not JSON: {exc}", source=uri) from None
    if isinstance(data, dict):
        data = data.get("coefficients") or data.get("best", {}).get("coefficients")
    if not isinstance(data, list) or not data:
        raise SpecError(f"{uri} holds no coefficients: give a JSON list, a combined.json or a result.json",
                        source=uri)
    return [float(x) for x in data]


def combine_checkpoints(checkpoints: CheckpointSetSpec, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """theta = sum_i alpha_i theta_i over the set in step order, holding one input checkpoint at a time."""
    listed = list_checkpoints(checkpoints)
    alphas = check_coefficients(coefficients, len(listed))
    combined: dict[str, torch.Tensor] | None = None
    for alpha, (uri, _step) in zip(alphas, listed):
        state = read_state_dict(uri, checkpoints.key)
        if combined is None:
            combined = {name: tensor.to(torch.float32) * alpha for name, tensor in state.items()}
            dtypes = {name: tensor.dtype for name, tensor in state.items()}
            continue
        for name, tensor in state.items():
            combined[name].add_(tensor.to(torch.float32), alpha=alpha)  # LCSC: sum_i alpha_i theta_i
    assert combined is not None  # check_coefficients guarantees at least one checkpoint
    return {name: tensor.to(dtypes[name]) if not dtypes[name].is_floating_point else tensor
            for name, tensor in combined.items()}


def export_combined(checkpoints: CheckpointSetSpec, coefficients: list[float], out_uri: str) -> dict:
    """Write the combination as .safetensors plus a JSON sidecar of coefficients and provenance."""
    listed = list_checkpoints(checkpoints)
    state = combine_checkpoints(checkpoints, coefficients)
    sidecar = {"coefficients": coefficients, "checkpoints": [u for u, _ in listed],
               "steps": [s for _, s in listed], "sum": float(np.sum(coefficients))}
    storage.write_bytes(out_uri, save_safetensors(state, metadata={"lcsc_coefficients": json.dumps(coefficients)}))
    artifacts.write_json(str(Path(out_uri).with_suffix(".json")) if not storage.is_remote(out_uri)
                         else out_uri.rsplit(".", 1)[0] + ".json", sidecar)
    return sidecar
