"""The `stream` placement's combination: safetensors files memory-mapped and summed window by window.

Each file is mapped read-only once per combination (its header read and checked against the set's layout, so a
file changed under a running search is an error, not silently different weights). The flat vector is walked in
windows (a part of one tensor, `window_values`); for each window, every checkpoint's bytes are viewed in place
(no copy, no safetensors `get_tensor`), summed in cache-sized chunks in the same per-element order as
`combine_flat` (checkpoint 0 first, then 1, ...), so the result equals `node`'s bit for bit. After a window is
summed its pages are unmapped (`MADV_DONTNEED`: they stay in the page cache, but leave the process), so an
evaluator holds its output buffer plus one window per checkpoint, whatever the model's size; without that, every
page of every file read would stay mapped until the combination ends (K models' worth of resident memory).
Asking the kernel to read the next window ahead (`MADV_WILLNEED`) was measured slower, warm and cold.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lcsc_ray.checkpoint_formats import header_length, parse_header
from lcsc_ray.combine import CPU_CHUNK, accumulate, is_float_dtype
from lcsc_ray.layout import STORAGE_DTYPES, Layout
from lcsc_ray.placement_files import SAFETENSORS_DTYPES
from schemas.errors import CheckpointError

WINDOW_MIN_BYTES = 1 << 20  # per checkpoint: below this the per-window system calls start to show
WINDOW_MAX_BYTES = 64 << 20
WINDOW_SHARE = (
    0.25  # all checkpoints' windows together take at most this share of one model (above the minimum)
)
# safetensors dtype -> (numpy dtype of its bytes, torch dtype they are viewed as)
NUMPY_VIEWS = {
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


def window_values(layout: Layout, count: int) -> int:
    """Values per window: `count` checkpoints' windows take about WINDOW_SHARE of one model (bounded by
    WINDOW_MIN_BYTES and WINDOW_MAX_BYTES each), a multiple of the combination chunk."""
    item = 4 if layout.storage_dtype == "float32" else 2
    share = WINDOW_SHARE * layout.numel * item / max(1, count)
    nbytes = min(WINDOW_MAX_BYTES, max(WINDOW_MIN_BYTES, share))
    return max(CPU_CHUNK, int(nbytes // item) // CPU_CHUNK * CPU_CHUNK)


def windows(layout: Layout, size: int) -> Iterator[tuple[int, int, int]]:
    """(tensor index, lo, hi): the flat vector in layout order, each tensor cut into parts of `size` values."""
    for index, shape in enumerate(layout.shapes):
        numel = math.prod(shape)
        for lo in range(0, numel, size):
            yield index, lo, min(numel, lo + size)


class MappedFile:
    """One safetensors checkpoint mapped read-only, with the byte span of each of the layout's tensors."""

    def __init__(self, path: str, uri: str, key: str | None, layout: Layout, field: str):
        self.uri = uri
        self.spans: list[tuple[int, np.dtype, torch.dtype]] = []  # file offset, numpy and torch dtype
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = header_length(handle.read(8), size, uri, field)
            header = parse_header(handle.read(length), size - 8 - length, uri, field)
            self.map = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) if size else None
        prefix = "" if key is None else key.rstrip(".") + "."
        for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes):
            entry = header.get(prefix + name)
            found = SAFETENSORS_DTYPES.get(entry["dtype"], "?") if isinstance(entry, dict) else None
            if entry is None or tuple(entry["shape"]) != shape or found != dtype:
                what = "no longer holds it" if entry is None else f"holds {entry['dtype']} {entry['shape']}"
                raise CheckpointError(
                    f"checkpoint {uri}: tensor {name!r} ({dtype} {list(shape)} in the set's layout) {what}; "
                    "the file changed after the search started: start it again (`--restart`)"
                )
            np_dtype, torch_dtype = NUMPY_VIEWS[entry["dtype"]]
            self.spans.append((8 + length + entry["data_offsets"][0], np.dtype(np_dtype), torch_dtype))

    def values(self, index: int, lo: int, hi: int) -> torch.Tensor:
        """Values [lo, hi) of layout tensor `index`, in the file's dtype: a read-only view of the mapping."""
        start, np_dtype, torch_dtype = self.spans[index]
        offset = start + lo * np_dtype.itemsize
        array = np.frombuffer(self.map, dtype=np_dtype, count=hi - lo, offset=offset)
        if offset % np_dtype.itemsize:
            array = (
                array.copy()
            )  # a misaligned tensor (not written by safetensors itself): copy, never misread
        tensor = _from_readonly(array)
        return tensor.view(torch_dtype) if np_dtype == np.uint16 else tensor

    def release(self, index: int, lo: int, hi: int) -> None:
        """Unmap the whole pages of values [lo, hi) of tensor `index` from this process (they stay in the page
        cache; a later read maps them again)."""
        if self.map is None or hi <= lo:
            return
        start, np_dtype, _ = self.spans[index]
        page = mmap.PAGESIZE
        begin = -(-(start + lo * np_dtype.itemsize) // page) * page
        end = (start + hi * np_dtype.itemsize) // page * page
        if end > begin:
            self.map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view is still referenced somewhere: the mapping goes with it
                pass


def _from_readonly(array: np.ndarray) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only mapping: we only read it
        return torch.from_numpy(array)


def combine_files(
    out: torch.Tensor,
    paths: Sequence[str],
    uris: Sequence[str],
    key: str | None,
    layout: Layout,
    coefficients: Sequence[float],
    start: bool = True,
    field: str = "checkpoints.uri",
) -> int:
    """sum_i coefficients[i] * checkpoint_i into `out` (`start` False: added to what `out` holds), integer and
    bool tensors copied from the last checkpoint; returns the bytes read from the files."""
    dtype = STORAGE_DTYPES[layout.storage_dtype]
    files = [MappedFile(path, uri, key, layout, field) for path, uri in zip(paths, uris)]
    read = 0
    try:
        parts = list(windows(layout, window_values(layout, len(files))))
        step = CPU_CHUNK if out.device.type == "cpu" else None
        for number, (index, lo, hi) in enumerate(parts):
            combined = is_float_dtype(layout.dtypes[index])
            used = files if combined else files[-1:]
            offset = layout.offsets[index]
            views = [file.values(index, lo, hi) for file in used]
            read += sum(view.numel() * view.element_size() for view in views)
            _sum_window(out[offset + lo : offset + hi], views, coefficients, dtype, step, start, combined)
            del views
            for file in used:
                file.release(index, lo, hi)
    finally:
        for file in files:
            file.close()
    return read


def _sum_window(
    acc: torch.Tensor,
    views: list[torch.Tensor],
    coefficients: Sequence[float],
    dtype: torch.dtype,
    step: int | None,
    start: bool,
    combined: bool,
) -> None:
    """One window: the weighted sum chunk by chunk (each chunk of `acc` stays in cache while the K inputs pass),
    or, for an integer or bool tensor, the last checkpoint's values."""
    size = acc.numel()
    for begin in range(0, size, step or size):
        end = min(size, begin + (step or size))
        chunk = acc[begin:end]
        if not combined:
            chunk.copy_(_as(views[-1][begin:end], dtype, chunk))
            continue
        for number, (alpha, view) in enumerate(zip(coefficients, views)):
            accumulate(chunk, _as(view[begin:end], dtype, chunk), alpha, first=start and number == 0)


def _as(values: torch.Tensor, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """Values in the storage dtype (as `Layout.flatten` stores them), on `like`'s device."""
    values = values if values.dtype == dtype else values.to(dtype)
    return values if values.device == like.device else values.to(like.device)
