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

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lcsc_ray import checkpoints
from lcsc_ray.checkpoint_formats import SAFETENSORS_HEADER_CAP
from lcsc_ray.checkpoints import list_checkpoints, parse_state_dict
from lcsc_ray.fid import parse_reference_stats
from schemas.errors import CheckpointError, ReferenceStatsError
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
    "offsets out of range": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}},
        8,
        "truncated",
    ),
    "negative offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, "data_offsets"),
    "overlapping": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlap",
    ),
    "unknown dtype": (
        {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
        8,
        "not a valid safetensors",
    ),
    "shape product overflows": (
        {"a": {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 8]}},
        8,
        "cannot fit",
    ),
    "negative dimension": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape"),
    "header is a list": ([1, 2, 3], 0, "not an object"),
    "header is a string": ("abc", 0, "not an object"),
    "entry is not an object": ({"a": 5}, 0, "not an object with a dtype"),
    "metadata not an object": ({"__metadata__": [1]}, 0, "__metadata__"),
    "size mismatch": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        8,
        "not a valid safetensors",
    ),
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
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(
                        ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Z9", ""]
                    ),
                    "shape": st.lists(st.integers(-2, 2**62), max_size=3),
                    "data_offsets": st.lists(st.integers(-4, 2**64), min_size=0, max_size=3),
                }
            ),
            st.integers(),
            st.text(max_size=3),
            st.none(),
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
    while central > 0 and data[central + 46 : central + 46 + len(info.filename)] != info.filename.encode():
        central = data.rfind(b"PK\x01\x02", 0, central)
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFFE)
    message = _refused(parse_state_dict, bytes(data), "/runs/zip.pt")
    assert "zip.pt is a corrupt torch (zip) file" in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_protocol_bytes_are_refused():
    """A bare pickle (no torch zip) is refused by weights_only with a named error."""
    data = pickle.dumps({"w": [1.0, 2.0]})
    assert "p.pt cannot be read" in _refused(parse_state_dict, data, "/runs/p.pt")


# ------------------------------------------------------------------------------------- reference .npz


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD_NPZ = _npz(mu=np.arange(3.0), sigma=np.eye(3))


def test_good_reference_stats_parse():
    """A proper mu/sigma .npz parses to float64 arrays."""
    mu, sigma = parse_reference_stats(GOOD_NPZ, "/ref.npz")
    assert mu.tolist() == [0.0, 1.0, 2.0] and sigma.dtype == np.float64


_NPZ_CASES = {
    "wrong keys": (_npz(mean=np.zeros(3), cov=np.eye(3)), "lack ['mu', 'sigma']"),
    "wrong shapes": (_npz(mu=np.zeros(3), sigma=np.eye(4)), "expected (d,) and (d, d)"),
    "mu not a vector": (_npz(mu=np.zeros((3, 1)), sigma=np.eye(3)), "expected (d,) and (d, d)"),
    "nan": (_npz(mu=np.array([0.0, np.nan, 1.0]), sigma=np.eye(3)), "mu holds 1 NaN/inf"),
    "inf": (_npz(mu=np.zeros(3), sigma=np.diag([1.0, np.inf, 1.0])), "sigma holds 1 NaN/inf"),
    "not symmetric": (_npz(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]])), "not symmetric"),
    "strings": (_npz(mu=np.array(["a", "b"]), sigma=np.eye(2)), "expected floating-point"),
    "not a zip": (b"mu,sigma\n1,2\n", "not a readable .npz"),
}


@pytest.mark.parametrize("case", sorted(_NPZ_CASES))
def test_bad_reference_stats_are_named(case):
    """Wrong keys, shapes, non-finite values or an asymmetric sigma give a ReferenceStatsError naming the file."""
    data, expected = _NPZ_CASES[case]
    message = _refused_stats(data)
    assert "/ref.npz" in message and "fid.reference.stats_uri" in message and expected in message


def test_npy_header_claiming_a_huge_shape_is_refused():
    """An .npz whose sigma header claims 10^10 values (with 72 bytes of data) is refused before allocating."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<f8", "fortran_order": False, "shape": (10**5, 10**5)}
    )
    npy.write(np.eye(3).tobytes())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mu.npy", _npz_member(np.zeros(3)))
        archive.writestr("sigma.npy", npy.getvalue())
    message = _refused_stats(buffer.getvalue())
    assert "'sigma.npy' claims shape (100000, 100000)" in message


def _npz_member(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@FUZZ
@given(st.data())
def test_reference_stats_truncated_or_flipped(data):
    """A valid .npz cut at any offset, or with a byte changed, parses to valid stats or is refused by name."""
    blob = bytearray(GOOD_NPZ)
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    tracemalloc.start()
    try:
        try:
            mu, sigma = parse_reference_stats(bytes(blob), "/ref.npz")
            assert sigma.shape == (len(mu), len(mu))
        except ReferenceStatsError as exc:
            assert "/ref.npz" in str(exc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT


def _refused_stats(data: bytes) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(ReferenceStatsError) as info:
            parse_reference_stats(data, "/ref.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT
    return str(info.value)
