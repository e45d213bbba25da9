"""Bad checkpoint files get a `CheckpointError` naming the file, never a crash: fuzzed with hypothesis.

Each case is also bounded in memory (tracemalloc peak of a few MB): a length read from a file is never trusted
beyond the file's own size.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tracemalloc
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lcsc_ray import checkpoints
from lcsc_ray.checkpoint_formats import SAFETENSORS_HEADER_CAP
from lcsc_ray.checkpoints import list_checkpoints, parse_state_dict
from schemas.errors import CheckpointError
from schemas.search import CheckpointSetSpec
from tests.lcsc_plugins import write_run

PEAK_LIMIT = 4 * 1024 * 1024  # bytes of Python allocations one bad file may cost
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_bytes() -> bytes:
    state = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(5)}
    return save(state, metadata={"step": "100"})


VALID = _valid_bytes()


def _raw_file(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _refused(fn, *args) -> str:
    """Run `fn(*args)`; it must raise CheckpointError within PEAK_LIMIT of Python memory. Returns the message."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"reading a bad file allocated {peak} bytes"
    return str(info.value)


def _parse_or_refuse(data: bytes, name: str = "x.safetensors") -> None:
    """Parsing either succeeds with a state dict or raises CheckpointError naming the file."""
    try:
        state = parse_state_dict(data, f"/runs/{name}")
    except CheckpointError as exc:
        assert name in str(exc)
        return
    assert all(isinstance(t, torch.Tensor) for t in state.values())


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_are_refused_by_name(data):
    """Random bytes as a .safetensors or .pt checkpoint are a CheckpointError naming the file."""
    for name in ("junk.safetensors", "junk.pt"):
        message = _refused(parse_state_dict, data, f"/runs/{name}")
        assert name in message


@FUZZ
@given(st.data())
def test_truncated_files_are_refused_when_parsed_and_listed(tmp_path, data):
    """A valid safetensors file cut at any offset is refused by the reader and by the header probe."""
    cut = data.draw(st.integers(0, len(VALID) - 1))
    path = tmp_path / "ckpt_000100.safetensors"
    path.write_bytes(VALID[:cut])
    assert "ckpt_000100.safetensors" in _refused(parse_state_dict, VALID[:cut], str(path))
    assert "ckpt_000100.safetensors" in _refused(checkpoints._probe, str(path), None)


def test_huge_header_length_is_refused_without_reading_it(tmp_path):
    """An 8-byte text file among good checkpoints (its bytes read as a 7 EB header length) is named at once."""
    write_run(tmp_path, num=3)
    (tmp_path / "ckpt_000100.safetensors").write_bytes(b"garbage!")
    message = _refused(list_checkpoints, CheckpointSetSpec(uri=str(tmp_path)))
    assert "ckpt_000100.safetensors" in message and "header" in message and "checkpoints.uri" in message


def test_header_over_the_format_cap_is_refused(tmp_path):
    """A header length over 100 MB is refused even when the file is that large (sparse file)."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", SAFETENSORS_HEADER_CAP + 1))
        handle.truncate(SAFETENSORS_HEADER_CAP + 64)  # sparse: no disk used
    assert "100000000-byte limit" in _refused(checkpoints._probe, str(path), None)


_ENTRY_CASES = {
    "offsets out of range": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}, 8, "truncated"),
    "negative offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, "data_offsets"),
    "overlapping": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
    "unknown dtype": ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, 8, "not a valid safetensors"),
    "shape product overflows": ({"a": {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 8]}},
                                8, "cannot fit"),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape"),
    "header is a list": ([1, 2, 3], 0, "not an object"),
    "header is a string": ("abc", 0, "not an object"),
    "entry is not an object": ({"a": 5}, 0, "not an object with a dtype"),
    "metadata not an object": ({"__metadata__": [1]}, 0, "__metadata__"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "not a valid safetensors"),
}


@pytest.mark.parametrize("case", sorted(_ENTRY_CASES))
def test_hostile_headers_are_named(case, tmp_path):
    """Headers with bad offsets, overlaps, unknown dtypes, overflowing shapes or non-objects give named errors."""
    header, data_size, expected = _ENTRY_CASES[case]
    data = _raw_file(header, bytes(data_size))
    message = _refused(parse_state_dict, data, "/runs/h.safetensors")
    assert "h.safetensors" in message and expected in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_named(value):
    """A tensor holding NaN or inf is refused naming the file and the tensor."""
    data = save({"w": torch.tensor([1.0, value])})
    message = _refused(parse_state_dict, data, "/runs/n.safetensors")
    assert "n.safetensors: tensor 'w' holds 1 NaN/inf" in message


@FUZZ
@given(
    header=st.dictionaries(
        st.text(max_size=4),
        st.one_of(
            st.fixed_dictionaries({
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Z9", ""]),
                "shape": st.lists(st.integers(-2, 2**62), max_size=3),
                "data_offsets": st.lists(st.integers(-4, 2**64), min_size=0, max_size=3),
            }),
            st.integers(), st.text(max_size=3), st.none(),
        ),
        max_size=4,
    ),
    data=st.binary(max_size=64),
)
def test_fuzzed_headers_parse_or_are_named(header, data):
    """Any JSON header over any data either parses into tensors or is a CheckpointError naming the file."""
    tracemalloc.start()
    try:
        _parse_or_refuse(_raw_file(header, data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_refused_by_weights_only_is_named(tmp_path):
    """A torch file holding a pickle that weights_only refuses is a CheckpointError, and its code never runs."""
    buffer = io.BytesIO()
    torch.save({"model": _Evil()}, buffer)
    message = _refused(parse_state_dict, buffer.getvalue(), "/runs/evil.pt")
    assert "evil.pt cannot be read as a torch file" in message and "\n" not in message


def test_torch_zip_entry_claiming_more_than_the_file_is_refused():
    """A torch zip whose entry claims far more bytes than the file holds is refused before torch reads it."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    data = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.infolist()[0]
    # patch the central directory's uncompressed size of the first entry to 4 GB - 1
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
    while central > 0 and data[central + 46:central + 46 + len(info.filename)] != info.filename.encode():
        central = data.rfind(b"PK\x01\x02", 0, central)
    data[central + 24:central + 28] = struct.pack("<I", 0xFFFFFFFE)
    message = _refused(parse_state_dict, bytes(data), "/runs/zip.pt")
    assert "zip.pt is a corrupt torch (zip) file" in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_protocol_bytes_are_refused():
    """A bare pickle (no torch zip) is refused by weights_only with a named error."""
    data = pickle.dumps({"w": [1.0, 2.0]})
    assert "p.pt cannot be read" in _refused(parse_state_dict, data, "/runs/p.pt")
