"""Checkpoint sets for LCSC: list, read (.safetensors / torch), validate, flatten once, put in object store.

Each checkpoint file is read from storage exactly once; listing reads at most the safetensors header (a
ranged read) for the training step and the tensor sizes. Each checkpoint becomes ONE contiguous flat array
(float32, or bfloat16 stored as uint16 bits) that is `ray.put` once; evaluators read it zero-copy.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from lcsc_ray import checkpoint_formats
from rayops import storage
from schemas.errors import CheckpointError, StorageError, StorageNotFoundError
from schemas.search import CheckpointSetSpec

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OBJECT_STORE_HEADROOM = 0.9  # keep 10% of the object store for samples, stats and Tune's own objects


@dataclass
class Layout:
    """Where each tensor lives inside a flat checkpoint array (kept once per set)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]  # original dtypes, e.g. 'float32'
    offsets: list[int]
    numel: int
    storage_dtype: str = "float32"

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], storage_dtype: str = "float32"
    ) -> Layout:
        """The layout of `state_dict` in its own key order."""
        names, shapes, dtypes, offsets, total = [], [], [], [], 0
        for name, tensor in state_dict.items():
            names.append(name)
            shapes.append(tuple(tensor.shape))
            dtypes.append(str(tensor.dtype).removeprefix("torch."))
            offsets.append(total)
            total += tensor.numel()
        return cls(names, shapes, dtypes, offsets, total, storage_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of one flat array in the storage dtype."""
        return self.numel * (4 if self.storage_dtype == "float32" else 2)

    def mismatch(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """A sentence naming the first tensor of `state_dict` that differs from this layout, or None."""
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            if name not in state_dict:
                return f"tensor {name!r} is missing"
            tensor = state_dict[name]
            if tuple(tensor.shape) != shape:
                return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            if str(tensor.dtype).removeprefix("torch.") != dtype:
                return f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}"
        extra = [name for name in state_dict if name not in set(self.names)]
        return f"tensor {extra[0]!r} is unexpected" if extra else None

    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One contiguous array: float32, or bfloat16 bits as uint16 (see `as_tensor`)."""
        flat = torch.empty(self.numel, dtype=STORAGE_DTYPES[self.storage_dtype])
        for name, offset in zip(self.names, self.offsets):
            tensor = state_dict[name]
            flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        if self.storage_dtype == "bfloat16":
            return flat.view(torch.uint16).numpy()
        return flat.numpy()

    def unflatten(self, flat: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> tensor views into `flat` (no copies), in the storage dtype."""
        tensor = as_tensor(flat)
        if tensor.numel() != self.numel:
            raise CheckpointError(f"flat array has {tensor.numel()} values, the layout expects {self.numel}")
        return {
            name: tensor[offset : offset + int(np.prod(shape, dtype=np.int64))].view(shape)
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }


def as_tensor(flat: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a flat array (uint16 bits become bfloat16); read-only arrays are never written."""
    if isinstance(flat, torch.Tensor):
        return flat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays: we only read them
        tensor = torch.from_numpy(flat)
    return tensor.view(torch.bfloat16) if flat.dtype == np.uint16 else tensor


# ------------------------------------------------------------------------------------------ reading


def _select_key(obj: object, key: str | None, uri: str) -> dict:
    if key is not None:
        for part in [key] if isinstance(obj, Mapping) and key in obj else key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(f"checkpoint {uri} has no key {key!r}; available keys: {keys}")
            obj = obj[part]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {uri} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {uri} is a dict of non-tensors ({not_tensors[:5]}); set `checkpoints.key` to the "
            f"entry holding the state dict, one of {sorted(map(str, obj))[:20]}"
        )
    return dict(obj)


def _load_safetensors(data: bytes, uri: str, key: str | None, field: str) -> dict[str, torch.Tensor]:
    state = checkpoint_formats.load_safetensors(data, uri, field)
    if key is None:
        return state
    prefix = key.rstrip(".") + "."
    selected = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
    if not selected:
        prefixes = sorted({name.split(".")[0] for name in state})
        raise CheckpointError(
            f"checkpoint {uri} has no key {key!r}; available top-level keys: {prefixes[:20]}"
        )
    return selected


def _check_finite(state: Mapping[str, torch.Tensor], uri: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"checkpoint {uri}: tensor {name!r} holds {bad} NaN/inf values; the training "
                "run diverged before this checkpoint, drop it from the set"
            )


def parse_state_dict(
    data: bytes, uri: str, key: str | None = None, field: str = "checkpoints.uri"
) -> dict[str, torch.Tensor]:
    """Parse checkpoint bytes (.safetensors by name, else a torch file) into a finite state dict; `field` is
    the spec field that names the file (quoted in errors)."""
    if uri.endswith(".safetensors"):
        state = _load_safetensors(data, uri, key, field)
    else:
        state = _select_key(checkpoint_formats.load_torch(data, uri, field), key, uri)
    _check_finite(state, uri)
    return state


def read_state_dict(
    uri: str, key: str | None = None, field: str = "checkpoints.uri"
) -> dict[str, torch.Tensor]:
    """Read one checkpoint (.safetensors, or torch with weights_only) from a local path, file:// or s3://."""
    try:
        data = storage.read_bytes(uri)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    return parse_state_dict(data, uri, key, field)


# ------------------------------------------------------------------------------------------ listing


@dataclass
class _Probe:
    step: int | None
    numel: int | None  # from the safetensors header; None for torch files
    file_size: int


def _name_step(uri: str) -> int | None:
    digits = re.findall(r"\d+", uri.rsplit("/", 1)[-1])
    return int(digits[-1]) if digits else None


def _probe(uri: str, key: str | None, field: str = "checkpoints.uri") -> _Probe:
    """Size, step and value count of one checkpoint, reading at most its safetensors header (bounded by the
    file's size and the format's header limit)."""
    try:
        size, _ = storage.stat(uri)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    step = _name_step(uri)
    if not uri.endswith(".safetensors"):
        return _Probe(step, None, size)
    try:
        length = checkpoint_formats.header_length(storage.read_range(uri, 0, 8), size, uri, field)
        raw = storage.read_range(uri, 8, length)
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    header = checkpoint_formats.parse_header(raw, size - 8 - length, uri, field)
    meta = header.get("__metadata__") or {}
    if str(meta.get("step", "")).isdigit():
        step = int(meta["step"])
    prefix = None if key is None else key.rstrip(".") + "."
    return _Probe(step, checkpoint_formats.numel_of(header, prefix), size)


def _spec_uris(spec: CheckpointSetSpec) -> list[str]:
    if spec.paths:
        return [p if "://" in p or os.path.isabs(p) else storage.join(spec.uri, p) for p in spec.paths]
    try:
        uris = storage.list_uris(spec.uri, spec.glob, recursive=False)  # the folder itself, not subfolders
    except StorageError as exc:
        raise CheckpointError(f"cannot list `checkpoints.uri` {spec.uri}: {exc}") from exc
    if not uris:
        raise CheckpointError(
            f"no checkpoints match {spec.glob!r} in {spec.uri} (subfolders are not searched); check "
            "`checkpoints.uri` and `checkpoints.glob`"
        )
    return uris


def _probe_all(spec: CheckpointSetSpec) -> list[tuple[str, _Probe]]:
    """The set in training order: explicit `paths` keep the order given; listed files are sorted by step,
    and a listed file without a step is refused (the order is never guessed)."""
    field = "checkpoints.paths" if spec.paths else "checkpoints.uri"
    if spec.format == "diffusers":  # an adapter lists the files and their steps; the rest is the same
        from lcsc_ray.diffusers_checkpoints import list_checkpoint_files

        probes = []
        for uri, step in list_checkpoint_files(spec):
            probe = _probe(uri, spec.key, field)
            probes.append((uri, _Probe(step, probe.numel, probe.file_size)))
        return probes[-spec.last :] if spec.last else probes
    probes = [(uri, _probe(uri, spec.key, field)) for uri in _spec_uris(spec)]
    if spec.paths:
        probes = [
            (uri, p if p.step is not None else _Probe(i, p.numel, p.file_size))
            for i, (uri, p) in enumerate(probes)
        ]
    else:
        unordered = [uri.rsplit("/", 1)[-1] for uri, p in probes if p.step is None]
        if unordered:
            raise CheckpointError(
                f"cannot order the checkpoints in {spec.uri}: {len(unordered)} file(s) have no training step "
                f"(no `step` in the safetensors metadata, no digits in the name): {unordered[:10]}; rename "
                "them with their step, narrow `checkpoints.glob`, or list the files in training order with "
                "`checkpoints.paths`"
            )
        probes.sort(key=lambda item: (item[1].step, item[0]))
    return probes[-spec.last :] if spec.last else probes


def checkpoint_name(uri: str) -> str:
    """How results name a checkpoint: its file name ('checkpoint-500/unet' for a diffusers folder)."""
    from lcsc_ray.diffusers_checkpoints import checkpoint_name as diffusers_name

    return diffusers_name(uri)


def ema_file(spec: CheckpointSetSpec) -> str | None:
    """The file of `ema_uri` (with format 'diffusers' it may name a model folder such as `unet_ema`)."""
    if spec.ema_uri is None or spec.format != "diffusers":
        return spec.ema_uri
    from lcsc_ray.diffusers_checkpoints import weights_file

    return weights_file(spec.ema_uri)


def list_checkpoints(spec: CheckpointSetSpec) -> list[tuple[str, int]]:
    """(uri, training step) of the set, ordered by step (safetensors metadata 'step', else the last digits of
    the file name; explicit `paths` keep their order), with `last` applied."""
    return [(uri, probe.step) for uri, probe in _probe_all(spec)]


# ------------------------------------------------------------------------------------ checkpoint set


@dataclass
class CheckpointSet:
    """A loaded set: one object-store ref per checkpoint (ordered by step), the layout kept once."""

    uris: list[str]
    names: list[str]
    steps: list[int]
    layout: Layout
    refs: list = field(repr=False)  # list[ray.ObjectRef], each a flat array put once
    ema_ref: object | None = field(default=None, repr=False)
    nbytes: int = 0  # bytes in the object store, EMA included
    # further weights of the same layout that only some evaluations combine (post-hoc EMA snapshots): a job
    # with len(refs) + len(extra_refs) coefficients combines them all, a job with len(refs) only the checkpoints
    extra_refs: list = field(default_factory=list, repr=False)
    extra_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)


def object_store_capacity() -> int:
    """Bytes of object store the running Ray cluster offers (available, else total)."""
    import ray

    if not ray.is_initialized():
        raise CheckpointError("Ray is not initialised; call ray.init (or rayops.session.ray_session) first")
    available = ray.available_resources().get("object_store_memory")
    return int(available if available else ray.cluster_resources().get("object_store_memory", 0))


def check_fits(need_bytes: int, capacity_bytes: int, num_checkpoints: int, storage_dtype: str) -> None:
    """Refuse a set that will not fit the object store, naming the sizes and the ways out."""
    if need_bytes <= OBJECT_STORE_HEADROOM * capacity_bytes:
        return
    gib = 1024**3
    options = [
        "keep fewer checkpoints with `checkpoints.last`",
        (
            "start Ray with a bigger object store (`ray.object_store_memory`, or `ray start "
            "--object-store-memory`)"
        ),
    ]
    if storage_dtype == "float32":
        half = need_bytes / 2 / gib
        options.insert(0, f"bfloat16 storage (`checkpoints.storage_dtype: bfloat16`, {half:.2f} GiB)")
    raise CheckpointError(
        f"{num_checkpoints} checkpoints need {need_bytes / gib:.2f} GiB of object store as {storage_dtype}, "
        f"which offers {capacity_bytes / gib:.2f} GiB ({OBJECT_STORE_HEADROOM:.0%} usable); options: "
        + "; ".join(options)
    )


def _estimate_bytes(probes: list[_Probe], storage_dtype: str) -> int:
    itemsize = 4 if storage_dtype == "float32" else 2
    # safetensors headers give exact sizes; torch files are estimated as float32 payloads of their file size
    return sum(p.numel * itemsize if p.numel is not None else p.file_size * itemsize // 4 for p in probes)


def _put_checked(
    uri: str,
    key: str | None,
    layout: Layout | None,
    first_uri: str | None,
    storage_dtype: str,
    field: str = "checkpoints.uri",
):
    import ray

    state = read_state_dict(uri, key, field)
    if layout is None:
        layout = Layout.from_state_dict(state, storage_dtype)
    else:
        problem = layout.mismatch(state)
        if problem:
            raise CheckpointError(f"checkpoint {uri} does not match {first_uri}: {problem}")
    flat = layout.flatten(state)
    del state
    return ray.put(flat), layout


def load_checkpoint_set(spec: CheckpointSetSpec) -> CheckpointSet:
    """List, check the object-store budget, then read each file once, validate against the first, flatten and
    `ray.put` it once. Ray must be initialised."""
    capacity = object_store_capacity()
    probed = _probe_all(spec)
    ema_uri = ema_file(spec)
    ema_probe = [_probe(ema_uri, spec.ema_key or spec.key, "checkpoints.ema_uri")] if ema_uri else []
    need = _estimate_bytes([p for _, p in probed] + ema_probe, spec.storage_dtype)
    check_fits(need, capacity, len(probed) + len(ema_probe), spec.storage_dtype)
    refs, layout = [], None
    field = "checkpoints.paths" if spec.paths else "checkpoints.uri"
    for uri, _ in probed:
        ref, layout = _put_checked(uri, spec.key, layout, probed[0][0], spec.storage_dtype, field)
        refs.append(ref)
    ema_ref = None
    if ema_uri:
        ema_ref, _ = _put_checked(
            ema_uri,
            spec.ema_key or spec.key,
            layout,
            probed[0][0],
            spec.storage_dtype,
            "checkpoints.ema_uri",
        )
    return CheckpointSet(
        uris=[uri for uri, _ in probed],
        names=[checkpoint_name(uri) for uri, _ in probed],
        steps=[probe.step for _, probe in probed],
        layout=layout,
        refs=refs,
        ema_ref=ema_ref,
        nbytes=layout.nbytes * (len(refs) + (ema_ref is not None)),
    )
