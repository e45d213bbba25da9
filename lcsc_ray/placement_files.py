"""Checkpoint files read tensor by tensor: safetensors memory-mapped through `safetensors.safe_open`.

The `sharded` and `stream` placements never hold a whole checkpoint in memory: they open a file, take the
tensors they need (converted to the storage dtype exactly as `Layout.flatten` does) and let each go after use.
Local files are mapped in place; S3 files are copied once per node into a local cache (keyed by URI, size and
ETag, so a changed object is fetched again) and mapped from there.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from lcsc_ray import checkpoint_formats
from lcsc_ray.layout import STORAGE_DTYPES, Layout
from rayops import storage
from schemas.errors import CheckpointError, StorageError, StorageNotFoundError

CACHE_DIR_ENV = "LCSC_RAY_CHECKPOINT_CACHE"  # where S3 checkpoints are cached on each node
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def cache_dir() -> Path:
    """The node-local folder S3 checkpoints are cached in (`$LCSC_RAY_CHECKPOINT_CACHE`, else the temp dir)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "lcsc-ray-checkpoints")


def local_file(uri: str, field: str = "checkpoints.uri") -> str:
    """A local path holding the bytes of `uri`: the file itself, or this node's cached copy of an S3 object."""
    try:
        if not storage.is_remote(uri):
            path = storage.parse_uri(uri).path
            if not path.is_file():
                raise StorageNotFoundError(f"read {uri}: no such file", uri=uri)
            return str(path)
        size, etag = storage.stat(uri)
        digest = hashlib.sha256(f"{uri}|{size}|{etag}".encode()).hexdigest()[:24]
        path = cache_dir() / f"{digest}-{uri.rsplit('/', 1)[-1]}"
        if not path.is_file() or path.stat().st_size != size:
            storage.download_file(uri, path)
        return str(path)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc


def require_safetensors(uri: str, mode: str) -> None:
    """`sharded` and `stream` read tensors one by one, which torch pickle-free files do not allow."""
    if not uri.endswith(".safetensors"):
        raise CheckpointError(
            f"checkpoint {uri} is not a .safetensors file, and `checkpoints.placement: {mode}` reads "
            "checkpoints tensor by tensor; convert the set to safetensors, or use `checkpoints.placement: node`"
        )


def _names(handle, key: str | None) -> dict[str, str]:
    """Layout name -> name in the file (with `key`, the tensors under that prefix, prefix removed)."""
    names = sorted(handle.keys())
    if key is None:
        return {name: name for name in names}
    prefix = key.rstrip(".") + "."
    return {name[len(prefix) :]: name for name in names if name.startswith(prefix)}


def header_layout(uri: str, key: str | None, storage_dtype: str, field: str = "checkpoints.uri") -> Layout:
    """The layout of one safetensors checkpoint from its header alone (two ranged reads; names sorted, as
    `load_safetensors` orders them), so the driver never reads the tensors of a set it does not hold."""
    try:
        size, _ = storage.stat(uri)
        length = checkpoint_formats.header_length(storage.read_range(uri, 0, 8), size, uri, field)
        raw = storage.read_range(uri, 8, length)
    except StorageNotFoundError:
        raise CheckpointError(f"checkpoint {uri} does not exist; check `{field}`") from None
    except StorageError as exc:
        raise CheckpointError(f"checkpoint {uri} cannot be read: {exc}") from exc
    header = checkpoint_formats.parse_header(raw, size - 8 - length, uri, field)
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if key is not None:
        prefix = key.rstrip(".") + "."
        entries = {name[len(prefix) :]: e for name, e in entries.items() if name.startswith(prefix)}
        if not entries:
            raise CheckpointError(f"checkpoint {uri} has no key {key!r}; check `checkpoints.key`")
    names, shapes, dtypes, offsets, total = [], [], [], [], 0
    for name in sorted(entries):
        shape = tuple(int(n) for n in entries[name]["shape"])
        names.append(name)
        shapes.append(shape)
        dtypes.append(SAFETENSORS_DTYPES.get(entries[name]["dtype"], entries[name]["dtype"].lower()))
        offsets.append(total)
        total += math.prod(shape)
    return Layout(names, shapes, dtypes, offsets, total, storage_dtype)


def check_same_layout(layout: Layout, other: Layout, uri: str, first_uri: str) -> None:
    """Every checkpoint of the set holds the same tensors (names, shapes, dtypes) as the first."""
    for name, shape, dtype in zip(other.names, other.shapes, other.dtypes):
        if name not in layout.names:
            raise CheckpointError(
                f"checkpoint {uri} does not match {first_uri}: tensor {name!r} is unexpected"
            )
        index = layout.names.index(name)
        if (layout.shapes[index], layout.dtypes[index]) != (shape, dtype):
            raise CheckpointError(
                f"checkpoint {uri} does not match {first_uri}: tensor {name!r} has shape {shape} and dtype "
                f"{dtype}, expected {layout.shapes[index]} and {layout.dtypes[index]}"
            )
    missing = [name for name in layout.names if name not in set(other.names)]
    if missing:
        raise CheckpointError(
            f"checkpoint {uri} does not match {first_uri}: tensor {missing[0]!r} is missing"
        )


def iter_tensors(
    path: str, uri: str, key: str | None, layout: Layout, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(flat offset, values in the storage dtype) of the parts of each tensor inside [start, stop) of the flat
    vector, one tensor at a time, read from the memory-mapped file; each must be finite."""
    from safetensors import safe_open

    stop = layout.numel if stop is None else stop
    dtype = STORAGE_DTYPES[layout.storage_dtype]
    with safe_open(path, framework="pt") as handle:
        names = _names(handle, key)
        for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets):
            numel = int(torch.Size(shape).numel())
            lo, hi = max(start, offset), min(stop, offset + numel)
            if lo >= hi:
                continue
            if name not in names:
                raise CheckpointError(f"checkpoint {uri} has no tensor {name!r}, unlike the rest of the set")
            tensor = handle.get_tensor(names[name])
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"checkpoint {uri}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
                )
            part = tensor.reshape(-1)[lo - offset : hi - offset]
            if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise CheckpointError(
                    f"checkpoint {uri}: tensor {name!r} holds NaN/inf values; the training run diverged "
                    "before this checkpoint, drop it from the set"
                )
            yield lo, part.to(dtype)
            del tensor, part


def read_flat(path: str, uri: str, key: str | None, layout: Layout, start: int, stop: int) -> torch.Tensor:
    """Values [start, stop) of the checkpoint's flat array, in the storage dtype (what `Layout.flatten` holds)."""
    out = torch.empty(stop - start, dtype=STORAGE_DTYPES[layout.storage_dtype])
    for offset, part in iter_tensors(path, uri, key, layout, start, stop):
        out[offset - start : offset - start + part.numel()].copy_(part)
    return out
