"""Safetensors files read defensively: every length a file states is bounded by the file's size.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (an object: tensor name ->
{dtype, shape, data_offsets}, plus an optional `__metadata__` of strings), then the tensor bytes. Whatever a file
says, nothing is allocated beyond its own size, and every defect is a `CheckpointError` naming the file, what is
wrong and the spec field that points at it. Both engines read their safetensors through here (LCSC's checkpoints,
CheckFree's Hugging Face weights).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping

import torch

from schemas.errors import CheckpointError

SAFETENSORS_HEADER_CAP = 100_000_000  # bytes: the safetensors format's own limit; real headers are KBs


def one_line(exc: BaseException, limit: int = 200) -> str:
    """`exc` as one short line: its type and the start of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def bad_file(uri: str, field: str, problem: str) -> CheckpointError:
    """The error for a checkpoint file at `uri` (listed by spec field `field`) that has `problem`."""
    return CheckpointError(f"checkpoint {uri} {problem} (listed by `{field}`); replace or remove the file")


def header_length(prefix: bytes, file_size: int, uri: str, field: str = "checkpoints.uri") -> int:
    """The safetensors header length stated by the first 8 bytes, checked against the file's size."""
    if len(prefix) < 8 or file_size < 8:
        raise CheckpointError(
            f"checkpoint {uri} is truncated: {file_size} bytes, not even a safetensors header "
            f"(listed by `{field}`)"
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > SAFETENSORS_HEADER_CAP:
        raise bad_file(
            uri,
            field,
            f"is not a safetensors file: its header claims {length} bytes, over the "
            f"{SAFETENSORS_HEADER_CAP}-byte limit of the format",
        )
    if 8 + length > file_size:
        raise CheckpointError(
            f"checkpoint {uri} is truncated inside its safetensors header: {file_size} bytes, the header "
            f"claims {8 + length} (listed by `{field}`); the file was cut short, or is not safetensors"
        )
    return length


def _shape(entry: Mapping, name: str, uri: str, field: str) -> list[int]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad_file(
            uri,
            field,
            f"has a corrupt header: tensor {name!r} has shape {str(shape)[:80]}, expected a "
            "list of non-negative integers",
        )
    return shape


def _span(entry: Mapping, name: str, data_size: int, uri: str, field: str) -> tuple[int, int]:
    offsets = entry.get("data_offsets")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise bad_file(
            uri, field, f"has a corrupt header: tensor {name!r} has data_offsets {str(offsets)[:80]}"
        )
    if offsets[1] > data_size:
        raise CheckpointError(
            f"checkpoint {uri} is truncated: tensor {name!r} ends at byte {offsets[1]} of the data, which has "
            f"{data_size} (listed by `{field}`); the file was cut short while writing or copying"
        )
    return offsets[0], offsets[1]


def parse_header(raw: bytes, data_size: int, uri: str, field: str = "checkpoints.uri") -> dict:
    """Parse a safetensors JSON header and check every entry against `data_size` (bytes after the header):
    shapes are lists of non-negative integers whose product fits the tensor's bytes, offsets lie inside the
    data and no two tensors overlap. Returns the header (a dict)."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad_file(uri, field, "is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise bad_file(
            uri,
            field,
            f"is not a safetensors file (its header is a JSON {type(header).__name__}, not an object)",
        )
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise bad_file(uri, field, "has a corrupt header: `__metadata__` is not an object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
            raise bad_file(uri, field, f"has a corrupt header: tensor {name!r} is not an object with a dtype")
        shape = _shape(entry, name, uri, field)
        begin, end = _span(entry, name, data_size, uri, field)
        if math.prod(shape) > 2 * (end - begin):  # every dtype takes at least half a byte per value
            raise bad_file(
                uri,
                field,
                f"has a corrupt header: tensor {name!r} of shape {shape} cannot fit its {end - begin} bytes",
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise bad_file(uri, field, f"has a corrupt header: tensors {name_a!r} and {name_b!r} overlap")
    return header


def numel_of(header: Mapping, prefix: str | None = None) -> int:
    """Values in the tensors of a checked header (only names starting with `prefix` when given)."""
    return sum(
        math.prod(e["shape"])
        for n, e in header.items()
        if n != "__metadata__" and (prefix is None or n.startswith(prefix))
    )


def load_safetensors(data: bytes, uri: str, field: str = "checkpoints.uri") -> dict[str, torch.Tensor]:
    """All tensors of safetensors bytes, sorted by name, after the header checks above."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    length = header_length(data[:8], len(data), uri, field)
    parse_header(data[8 : 8 + length], len(data) - 8 - length, uri, field)
    try:
        state = load(data)
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise bad_file(uri, field, f"is not a valid safetensors file ({one_line(exc)})") from None
    return dict(sorted(state.items()))  # safetensors keeps no meaningful order: a deterministic layout
