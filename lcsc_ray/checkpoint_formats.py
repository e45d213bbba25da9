"""Checkpoint file formats read defensively: every length a file states is bounded by the file's size.

A torch file is a zip archive (entries stored, not compressed) read with `weights_only=True`. Whatever a file
says, nothing is allocated beyond its own size, and every defect is a `CheckpointError` naming the file, what is
wrong and the spec field that points at it. Safetensors files are read by `rayops.safetensors_files` (shared with
CheckFree); its names are re-exported here for LCSC's modules.
"""

from __future__ import annotations

import io
import zipfile

import torch

from rayops.safetensors_files import (  # noqa: F401 - re-exported: LCSC's modules read them from here
    SAFETENSORS_HEADER_CAP,
    bad_file,
    header_length,
    load_safetensors,
    numel_of,
    one_line,
    parse_header,
)
from schemas.errors import CheckpointError

TORCH_ZIP_RATIO_CAP = 16  # a compressed torch entry may expand at most this much over the whole file


def check_torch_zip(data: bytes, uri: str, field: str = "checkpoints.uri") -> None:
    """Refuse a torch zip archive whose entries claim more bytes than the file could hold."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        return  # not a zip: the legacy torch format, or garbage that torch.load refuses
    try:
        with zipfile.ZipFile(buffer) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise bad_file(uri, field, f"is a corrupt torch (zip) file ({exc})") from None
    for info in entries:
        limit = len(data) if info.compress_type == zipfile.ZIP_STORED else TORCH_ZIP_RATIO_CAP * len(data)
        if info.file_size > limit or info.compress_size > len(data) or info.header_offset > len(data):
            raise bad_file(
                uri,
                field,
                f"is a corrupt torch (zip) file: entry {info.filename!r} claims "
                f"{info.file_size} bytes in a file of {len(data)}",
            )


def load_torch(data: bytes, uri: str, field: str = "checkpoints.uri") -> object:
    """The object in torch-file bytes, loaded with `weights_only=True` (no arbitrary code runs)."""
    check_torch_zip(data, uri, field)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types; each becomes an error naming the file
        raise CheckpointError(
            f"checkpoint {uri} cannot be read as a torch file ({one_line(exc)}) (listed by `{field}`)"
        ) from None
