"""Apply known coefficients to a checkpoint set without Ray, streaming one checkpoint at a time.

This is the only route to a combined checkpoint file: a search's `combined.safetensors` and `lcsc-ray combine`
both call `combined_safetensors`, so the same coefficients over the same files give byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from lcsc_ray.checkpoints import checkpoint_name, list_checkpoints, read_state_dict
from lcsc_ray.combine import check_coefficients, combine_states
from rayops import artifacts, storage
from schemas.errors import SpecError
from schemas.search import CheckpointSetSpec, SearchSpec

DIFFUSERS_FOLDER = "diffusers/unet"  # beside combined.json: the winner as a diffusers model folder


def read_coefficients(uri: str) -> list[float]:
    """Coefficients from a JSON list, a `combined.json` sidecar or a search's `result.json`."""
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise SpecError(f"{uri} is not JSON: {exc}", source=uri) from None
    if isinstance(data, dict):
        data = data.get("coefficients") or data.get("best", {}).get("coefficients")
    if not isinstance(data, list) or not data:
        raise SpecError(
            f"{uri} holds no coefficients: give a JSON list, a combined.json or a result.json", source=uri
        )
    return [float(x) for x in data]


def _states(uris: list[str], key: str | None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    for uri in uris:
        yield uri, read_state_dict(uri, key)


def combine_checkpoints(checkpoints: CheckpointSetSpec, coefficients: list[float]) -> dict[str, torch.Tensor]:
    """theta = sum_i alpha_i theta_i over the set in step order, holding one input checkpoint at a time
    (floating tensors in float32, integer and bool tensors copied from the last checkpoint)."""
    uris = [uri for uri, _step in list_checkpoints(checkpoints)]
    alphas = check_coefficients(coefficients, len(uris))
    return combine_states(_states(uris, checkpoints.key), alphas)


def combined_safetensors(checkpoints: CheckpointSetSpec, coefficients: list[float]) -> tuple[bytes, dict]:
    """The combined weights as .safetensors bytes (coefficients and checkpoint names in its metadata), and a
    sidecar dict of coefficients and provenance."""
    listed = list_checkpoints(checkpoints)
    state = combine_checkpoints(checkpoints, coefficients)
    names = [checkpoint_name(uri) for uri, _ in listed]
    # One metadata key: safetensors writes several in hash order, which would change the bytes from run to run.
    metadata = {
        "lcsc": json.dumps(
            {"coefficients": [float(c) for c in coefficients], "checkpoints": names}, sort_keys=True
        )
    }
    sidecar = {
        "coefficients": [float(c) for c in coefficients],
        "checkpoints": [u for u, _ in listed],
        "steps": [s for _, s in listed],
        "sum": float(np.sum(coefficients)),
    }
    return save_safetensors(state, metadata=metadata), sidecar


def diffusers_folder(
    checkpoints: CheckpointSetSpec, combined: bytes, config_uri: str | None = None
) -> dict[str, bytes]:
    """With `checkpoints.format: diffusers`, the combined weights (`combined_safetensors`' bytes) as the files of
    a model folder `UNet2DModel.from_pretrained` loads, by name under the output ({} for other formats); the
    model config comes from `config_uri`, else from the checkpoints."""
    if checkpoints.format != "diffusers":
        return {}
    from lcsc_ray.diffusers_checkpoints import diffusers_model_files

    return diffusers_model_files(checkpoints, combined, config_uri, DIFFUSERS_FOLDER)


def search_diffusers_folder(spec: SearchSpec, combined: bytes) -> dict[str, bytes]:
    """`diffusers_folder` for a search, with the config its model plug-in was built from."""
    config_uri = spec.model.kwargs.get("config_uri")
    return diffusers_folder(spec.checkpoints, combined, config_uri if isinstance(config_uri, str) else None)


def export_combined(checkpoints: CheckpointSetSpec, coefficients: list[float], out_uri: str) -> dict:
    """Write the combination as .safetensors plus a JSON sidecar of coefficients and provenance (and, for
    diffusers checkpoints, a model folder `diffusers/unet/` beside them)."""
    data, sidecar = combined_safetensors(checkpoints, coefficients)
    storage.write_bytes(out_uri, data)
    folder = out_uri.rsplit("/", 1)[0] if "/" in out_uri else "."
    for name, content in diffusers_folder(checkpoints, data).items():
        storage.write_bytes(storage.join(folder, name), content)
    artifacts.write_json(
        str(Path(out_uri).with_suffix(".json"))
        if not storage.is_remote(out_uri)
        else out_uri.rsplit(".", 1)[0] + ".json",
        sidecar,
    )
    return sidecar
