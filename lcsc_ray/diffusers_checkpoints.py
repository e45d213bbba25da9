"""diffusers checkpoints in, diffusers model out: an adapter beside the LCSC engine.

The diffusers training scripts (`train_unconditional.py`, `train_text_to_image.py`, ...) save, every
`checkpointing_steps`, a folder per step under their `output_dir`:

    output_dir/checkpoint-N/unet/config.json                              the model's config
    output_dir/checkpoint-N/unet/diffusion_pytorch_model.safetensors      the weights
    output_dir/checkpoint-N/unet_ema/...                                  the EMA (with --use_ema)
    output_dir/checkpoint-N/model.safetensors                             accelerate's own save (no hooks)
    output_dir/unet/, output_dir/unet_ema/, output_dir/scheduler/         the final pipeline

This module turns such a run into the flat set the engine already uses: one safetensors file per checkpoint,
ordered by the step N in its folder name (`list_checkpoint_files`), read by `lcsc_ray.checkpoints`' bounded
reader like any other. `build_model` is the model plug-in (UNet2DModel or UNet2DConditionModel from the saved
`config.json`), and `diffusers_model_files` writes a combined state dict as a folder that
`UNet2DModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from rayops import storage
from schemas.errors import CheckpointError, StorageError, StorageNotFoundError
from schemas.search import CheckpointSetSpec

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ACCELERATE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_STEP_FOLDER = re.compile(r"^checkpoint-(\d+)$")
_EMA_NAME = re.compile(r"(^|[_\-.])ema($|[_\-.])", re.IGNORECASE)


def _rel_files(uri: str) -> list[str]:
    try:
        return [u[len(uri.rstrip("/")) + 1 :] for u in storage.list_uris(uri, recursive=True)]
    except StorageError as exc:
        raise CheckpointError(f"cannot list `checkpoints.uri` {uri}: {exc}") from exc


def is_ema_subfolder(subfolder: str) -> bool:
    """True for an EMA model folder ('unet_ema', 'ema_unet', 'transformer-ema', ...)."""
    return _EMA_NAME.search(subfolder) is not None


def _candidates(folder: str, subfolder: str) -> list[str]:
    """Where one checkpoint folder's weights may lie, in order: the model's subfolder, then accelerate's
    `model.safetensors`. accelerate saves the trained (non-EMA) model there, so an EMA subfolder has no fallback."""
    names = [f"{folder}/{subfolder}/{WEIGHTS_NAME}"]
    if not is_ema_subfolder(subfolder):
        names.append(f"{folder}/{ACCELERATE_NAME}")
    return names


def _weights_in(folder: str, files: set[str], subfolder: str) -> str | None:
    """The weights file of one checkpoint folder (relative names in `files`), see `_candidates`."""
    for name in _candidates(folder, subfolder):
        if name.lstrip("/") in files:
            return name.lstrip("/")
    return None


def _missing_weights(folder_uri: str, subfolders: list[str], subfolder: str, field: str) -> CheckpointError:
    """The refusal of a checkpoint folder without the weights `subfolder` names, listing what it does hold."""
    held = f"its subfolders: {', '.join(subfolders)}" if subfolders else "it has no subfolders"
    fix = "fix the path in `checkpoints.paths`" if field == "checkpoints.paths" else "remove the folder"
    if is_ema_subfolder(subfolder):
        return CheckpointError(
            f"checkpoint folder {folder_uri} holds no {subfolder}/{WEIGHTS_NAME} ({held}); its {ACCELERATE_NAME}, "
            "if any, is the non-EMA model and is not read in place of the EMA. Was the run saved without "
            f"--use_ema? Set `checkpoints.subfolder` to a subfolder every checkpoint holds, or {fix}"
        )
    return CheckpointError(
        f"checkpoint folder {folder_uri} holds neither {subfolder}/{WEIGHTS_NAME} nor {ACCELERATE_NAME} ({held}; "
        f"an interrupted save?); {fix}, or set `checkpoints.subfolder`"
    )


def _subfolders_in(folder: str, files: set[str]) -> list[str]:
    """Names of the subfolders of `folder` that hold files (`files`: names relative to the set's root; with
    folder '', `files` are relative to the folder itself)."""
    prefix = f"{folder}/" if folder else ""
    inside = (f[len(prefix) :] for f in files if f.startswith(prefix))
    return sorted({rest.split("/", 1)[0] for rest in inside if "/" in rest})


def list_checkpoint_files(spec: CheckpointSetSpec) -> list[tuple[str, int]]:
    """(weights file URI, step) of every `checkpoint-N` folder under `spec.uri`, ordered by N; with
    `spec.paths`, the named folders in the order given (step from the name, else the position). A checkpoint
    folder without weights is refused by name, never skipped."""
    if spec.paths:
        return [_explicit(path, i, spec) for i, path in enumerate(spec.paths)]
    files = set(_rel_files(spec.uri))
    folders = sorted(
        {f.split("/", 1)[0] for f in files if "/" in f and _STEP_FOLDER.match(f.split("/", 1)[0])},
        key=lambda name: int(_STEP_FOLDER.match(name).group(1)),
    )
    if not folders:
        raise CheckpointError(
            f"no `checkpoint-N` folders in {spec.uri} (`checkpoints.format: diffusers` reads the folders a diffusers "
            "training script saves with --checkpointing_steps); check `checkpoints.uri`, or use `format: files`"
        )
    found = []
    for folder in folders:
        weights = _weights_in(folder, files, spec.subfolder)
        if weights is None:
            raise _missing_weights(
                storage.join(spec.uri, folder),
                _subfolders_in(folder, files),
                spec.subfolder,
                "checkpoints.uri",
            )
        found.append((storage.join(spec.uri, weights), int(_STEP_FOLDER.match(folder).group(1))))
    return found


def _explicit(path: str, index: int, spec: CheckpointSetSpec) -> tuple[str, int]:
    folder = path if "://" in path or Path(path).is_absolute() else storage.join(spec.uri, path)
    folder = folder.rstrip("/")
    for candidate in _candidates(folder, spec.subfolder):
        if storage.exists(candidate):
            match = _STEP_FOLDER.match(folder.rsplit("/", 1)[-1])
            return candidate, int(match.group(1)) if match else index
    raise _missing_weights(
        folder, _subfolders_in("", set(_rel_files(folder))), spec.subfolder, "checkpoints.paths"
    )


def weights_file(uri: str) -> str:
    """A diffusers model folder's weights file (a file URI is returned as is)."""
    return uri if uri.endswith(".safetensors") else storage.join(uri.rstrip("/"), WEIGHTS_NAME)


def checkpoint_name(uri: str) -> str:
    """A readable name of a checkpoint file: 'checkpoint-500/unet' for diffusers layouts, else the file name."""
    parts = uri.rstrip("/").split("/")
    if parts[-1] == WEIGHTS_NAME and len(parts) >= 3:
        return "/".join(parts[-3:-1])
    if parts[-1] == ACCELERATE_NAME and len(parts) >= 2 and _STEP_FOLDER.match(parts[-2]):
        return parts[-2]
    return parts[-1]


# ------------------------------------------------------------------------------------------ configs


def _read_json(uri: str, field: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(uri))
    except StorageNotFoundError:
        raise CheckpointError(f"{uri} does not exist; check `{field}`") from None
    except ValueError as exc:
        raise CheckpointError(f"{uri} is not JSON ({exc}); check `{field}`") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{uri} holds a JSON {type(data).__name__}, not a config object; check `{field}`"
        )
    return data


def config_file(config_uri: str, subfolder: str = "unet") -> str:
    """Where the model's config.json is: `config_uri` itself (a .json), a model folder holding config.json,
    or a run folder (its newest `checkpoint-N/<subfolder>/`, else its final `<subfolder>/`)."""
    if config_uri.endswith(".json"):
        return config_uri
    root = config_uri.rstrip("/")
    if storage.exists(storage.join(root, CONFIG_NAME)):
        return storage.join(root, CONFIG_NAME)
    files = set(_rel_files(root)) if storage.exists(root) or "://" in root else set()
    steps = sorted(
        (int(m.group(1)), f)
        for f in files
        if (m := _STEP_FOLDER.match(f.split("/", 1)[0])) and f == f"{m.group(0)}/{subfolder}/{CONFIG_NAME}"
    )
    if steps:
        return storage.join(root, steps[-1][1])
    if f"{subfolder}/{CONFIG_NAME}" in files:
        return storage.join(root, subfolder, CONFIG_NAME)
    raise CheckpointError(
        f"no {CONFIG_NAME} for the model in {config_uri} (looked for {CONFIG_NAME}, checkpoint-N/{subfolder}/"
        f"{CONFIG_NAME} and {subfolder}/{CONFIG_NAME}); set `model.kwargs.config_uri` to the model's config.json"
    )


@lru_cache(maxsize=8)
def scheduler_config(uri: str) -> dict:
    """A scheduler config: a .json file, or a folder holding `scheduler_config.json` (cached per process)."""
    path = uri if uri.endswith(".json") else storage.join(uri.rstrip("/"), "scheduler_config.json")
    return _read_json(path, "sampler.kwargs.scheduler_config")


def _run_scheduler_config(config_path: str) -> str | None:
    """The run's `scheduler/scheduler_config.json` beside a config found in `run/[checkpoint-N/]unet/`."""
    parts = config_path.split("/")
    roots = ["/".join(parts[:-2])]  # run/unet/config.json
    if len(parts) > 3 and _STEP_FOLDER.match(parts[-3]):
        roots.insert(0, "/".join(parts[:-3]))  # run/checkpoint-N/unet/config.json
    for root in roots:
        if root and storage.exists(f"{root}/{SCHEDULER_CONFIG}"):
            return f"{root}/{SCHEDULER_CONFIG}"
    return None


def build_model(
    config_uri: str, subfolder: str = "unet", scheduler_config: str | None = None
) -> torch.nn.Module:
    """Model plug-in: UNet2DModel or UNet2DConditionModel (as the saved config's `_class_name` says) built
    with `from_config` from `config_uri` (see `config_file`). The run's scheduler config, when found beside
    it (or given), rides along as `model.lcsc_scheduler_config` for `lcsc_ray.diffusers_sampling:sample`."""
    import diffusers

    path = config_file(config_uri, subfolder)
    config = _read_json(path, "model.kwargs.config_uri")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name not in MODEL_CLASSES:
        raise CheckpointError(
            f"{path} configures a {class_name}; the diffusers reader builds {MODEL_CLASSES}; "
            "give your own `model.target` for other models"
        )
    model = getattr(diffusers, class_name).from_config(config)
    found = scheduler_config or _run_scheduler_config(path)
    model.lcsc_scheduler_config = globals()["scheduler_config"](found) if found else None
    return model


# ------------------------------------------------------------------------------------------- export


def diffusers_model_files(
    checkpoints: CheckpointSetSpec,
    combined: bytes,
    config_uri: str | None = None,
    folder: str = "diffusers/unet",
) -> dict[str, bytes]:
    """The combined weights (`combined`: export's .safetensors bytes) as a diffusers model folder written with
    `save_pretrained`: {'<folder>/config.json': ..., '<folder>/diffusion_pytorch_model.safetensors': ...}."""
    from safetensors.torch import load

    model = build_model(config_uri or checkpoints.uri, checkpoints.subfolder)
    model.load_state_dict(load(combined), strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return {f"{folder}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
