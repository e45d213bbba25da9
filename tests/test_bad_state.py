"""State, result and manifest files read on resume: a corrupt one names the file and how to start over; no
length a file states is trusted beyond its size."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcsc_ray.evaluation_store import EvaluationStore, evaluation_key
from rayops import artifacts
from schemas.errors import ChecksumError, IncompleteArtifactError, StateFileError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("content", [b'{"fid": 12.', b"\x00\xff garbage", b""])
def test_corrupt_state_json_names_file_and_restart(tmp_path, content):
    """Corrupt JSON read on resume names the file and says how to start over."""
    path = tmp_path / "state" / "spec.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(StateFileError) as info:
        artifacts.read_state_json(str(path))
    assert str(path) in str(info.value) and "--restart" in str(info.value) and "output.uri" in str(info.value)


def test_oversized_json_is_refused_before_reading(tmp_path):
    """A JSON file larger than the limit for its kind is refused from its size alone."""
    path = tmp_path / "big.json"
    with open(path, "wb") as handle:
        handle.truncate(artifacts.STATE_JSON_MAX_BYTES + 1)  # sparse
    tracemalloc.start()
    try:
        with pytest.raises(StateFileError, match="over the"):
            artifacts.read_state_json(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def test_corrupt_evaluation_record_is_named(tmp_path):
    """A corrupt record in the evaluation store fails the resume naming the record, not a JSONDecodeError."""
    store = EvaluationStore(str(tmp_path / "evals"))
    store.put([0.5, 0.5], 64, 0, {"fid": 3.0})
    record = tmp_path / "evals" / f"{evaluation_key([0.5, 0.5], 64, 0)}.json"
    record.write_text("[1, 2")
    with pytest.raises(StateFileError) as info:
        EvaluationStore(str(tmp_path / "evals")).get([0.5, 0.5], 64, 0)
    assert record.name in str(info.value) and "--restart" in str(info.value)
    record.write_text("[1, 2]")
    with pytest.raises(StateFileError, match="not an evaluation record"):
        EvaluationStore(str(tmp_path / "evals")).get([0.5, 0.5], 64, 0)


def _artifact(tmp_path) -> str:
    uri = str(tmp_path / "art")
    artifacts.write_artifact(uri, {"w.bin": b"w" * 100, "x.json": b"{}"})
    return uri


def test_manifest_size_larger_than_the_file_is_refused_before_reading(tmp_path):
    """A manifest listing 10^12 bytes for a 100-byte file gives a ChecksumError from the file's size."""
    uri = _artifact(tmp_path)
    manifest = json.loads((tmp_path / "art" / artifacts.MANIFEST_NAME).read_text())
    manifest["files"]["w.bin"]["size"] = 10**12
    (tmp_path / "art" / artifacts.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ChecksumError, match=r"w\.bin: 100 bytes, the manifest lists 1000000000000"):
        artifacts.read_artifact(uri)


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )
)
def test_fuzzed_manifests_are_corrupt_or_read(tmp_path, value):
    """Any JSON value as a manifest is either read (every listed file verified) or named as corrupt."""
    uri = _artifact(tmp_path)
    (tmp_path / "art" / artifacts.MANIFEST_NAME).write_text(json.dumps(value))
    try:
        files, _ = artifacts.read_artifact(uri)
    except IncompleteArtifactError as exc:
        assert "MANIFEST.json is corrupt" in str(exc)
    except (ChecksumError, FileNotFoundError) as exc:
        assert str(tmp_path) in str(exc)
    else:
        assert files == {}


def test_manifest_entry_without_sha256_is_corrupt(tmp_path):
    """A manifest entry lacking a sha256 is named as corrupt, not a KeyError."""
    uri = _artifact(tmp_path)
    (tmp_path / "art" / artifacts.MANIFEST_NAME).write_text(json.dumps({"files": {"w.bin": {"size": 100}}}))
    with pytest.raises(IncompleteArtifactError, match="entry 'w.bin' has no sha256"):
        artifacts.read_artifact(uri)
