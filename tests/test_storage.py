"""Storage over local paths, moto and a real SeaweedFS server: atomic artifacts, clear errors, retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rayops import artifacts, storage
from rayops.s3_server import free_port
from schemas.errors import (
    ChecksumError,
    IncompleteArtifactError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageUnavailableError,
)


@pytest.fixture(params=["local", "file", "moto"])
def any_root(request, tmp_path, moto_bucket):
    """A root URI on each backend."""
    return {
        "local": str(tmp_path / "root"),
        "file": f"file://{tmp_path}/root",
        "moto": f"{moto_bucket}/root",
    }[request.param]


def test_read_write_list_exists_delete(any_root):
    """The basic operations agree across local paths, file:// and s3://."""
    a, b = storage.join(any_root, "a.bin"), storage.join(any_root, "sub", "b.txt")
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta")
    assert storage.read_bytes(a) == b"alpha"
    assert storage.exists(a) and not storage.exists(storage.join(any_root, "zzz"))
    assert [u.rsplit("/", 1)[-1] for u in storage.list_uris(any_root)] == ["a.bin", "b.txt"]
    assert storage.list_uris(any_root, "*.txt", recursive=True)[0].endswith("sub/b.txt")
    assert len(storage.list_uris(any_root, recursive=False)) == 1
    storage.delete(a)
    assert not storage.exists(a)
    with pytest.raises(StorageNotFoundError, match="a.bin"):
        storage.read_bytes(a)
    storage.delete(any_root, recursive=True)
    assert storage.list_uris(any_root) == []


def test_artifact_round_trip_and_checksum(any_root):
    """An artifact reads back verified; a changed file is a ChecksumError naming it."""
    uri = storage.join(any_root, "ckpt-1")
    artifacts.write_artifact(uri, {"w.bin": b"\x01" * 1000, "meta.json": b"{}"}, {"step": 1})
    files, manifest = artifacts.read_artifact(uri)
    assert files["w.bin"] == b"\x01" * 1000 and manifest["metadata"] == {"step": 1}
    storage.write_bytes(storage.join(uri, "w.bin"), b"\x02" * 1000)
    with pytest.raises(ChecksumError, match="w.bin"):
        artifacts.read_artifact(uri)


def test_artifact_without_manifest_is_incomplete(any_root):
    """Data without a manifest is reported incomplete, and a missing artifact as not found."""
    uri = storage.join(any_root, "half")
    storage.write_bytes(storage.join(uri, "w.bin"), b"x")
    with pytest.raises(IncompleteArtifactError, match="no MANIFEST.json"):
        artifacts.read_manifest(uri)
    assert not artifacts.is_complete(uri)
    with pytest.raises(StorageNotFoundError):
        artifacts.read_manifest(storage.join(any_root, "never"))


def test_overwrite_removes_old_manifest_first(tmp_path):
    """While an artifact is being rewritten it is not complete."""
    uri = str(tmp_path / "art")
    artifacts.write_artifact(uri, {"a": b"1"})
    with pytest.raises(OSError):
        artifacts.write_artifact(uri, {"a": tmp_path / "does-not-exist"})
    assert not artifacts.is_complete(uri)


def test_bad_uris_name_the_problem():
    """Unsupported schemes and bad bucket names are StorageErrors naming the URI."""
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.parse_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="3-63 characters"):
        storage.parse_uri("s3://ab/x")


def test_50mb_artifact_round_trips_on_seaweedfs(s3_bucket, tmp_path):
    """A 50 MB file is uploaded by multipart to SeaweedFS and reads back byte-identical."""
    payload = os.urandom(50 * 1024 * 1024)
    local = tmp_path / "big.bin"
    local.write_bytes(payload)
    uri = f"{s3_bucket}/artifacts/big"
    manifest = artifacts.write_artifact(uri, {"big.bin": local})
    assert manifest["files"]["big.bin"]["size"] == len(payload)
    loc = storage.parse_uri(storage.join(uri, "big.bin"))
    head = storage.s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    assert "-" in head["ETag"], "expected a multipart ETag"
    assert artifacts.read_artifact_file(uri, "big.bin") == payload


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from rayops import artifacts, storage
    real_write = storage.write_bytes
    def write_then_die(uri, data):
        if uri.endswith("MANIFEST.json") and data:
            os.kill(os.getpid(), signal.SIGKILL)  # die between the data and the manifest
        real_write(uri, data)
    storage.write_bytes = write_then_die
    artifacts.write_artifact(sys.argv[1], {"weights.bin": b"w" * 4_000_000, "opt.bin": b"o" * 1000})
    """
)


def test_writer_killed_before_manifest_leaves_incomplete_artifact(s3_bucket):
    """A writer SIGKILLed between data and manifest leaves an artifact readers call incomplete."""
    uri = f"{s3_bucket}/ckpt/step-10"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, uri], env=os.environ.copy(), check=False, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL
    assert storage.exists(storage.join(uri, "weights.bin"))  # the data really landed
    with pytest.raises(IncompleteArtifactError, match="step-10"):
        artifacts.read_artifact(uri)


def test_wrong_keys_name_the_bucket(s3_bucket, monkeypatch):
    """Wrong credentials give a permission error naming the bucket and never the secret."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    bucket = s3_bucket.removeprefix("s3://")
    with pytest.raises(StoragePermissionError) as info:
        storage.write_bytes(f"{s3_bucket}/x.bin", b"x")
    assert bucket in str(info.value) and "super-secret-value" not in str(info.value)
    with pytest.raises(StoragePermissionError, match=bucket):
        storage.list_uris(s3_bucket)


def test_missing_bucket_is_not_found(s3_bucket):
    """A bucket that does not exist is named in a not-found error, raised without retries."""
    with pytest.raises(StorageNotFoundError, match="no-such-bucket-42"):
        storage.read_bytes("s3://no-such-bucket-42/x")


def test_server_down_retries_then_clear_error(monkeypatch):
    """With the endpoint down, the client retries and fails within a bounded time, naming the URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("LCSC_STORAGE_MAX_ATTEMPTS", "3")
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"s3://down-bucket/x.*unreachable after retries"):
        storage.read_bytes("s3://down-bucket/x")
    assert time.monotonic() - start < 30


def test_data_survives_seaweedfs_restart(s3_bucket, seaweedfs):
    """A complete artifact is still complete after the server is killed and restarted."""
    uri = f"{s3_bucket}/persist"
    artifacts.write_artifact(uri, {"w.bin": b"persist" * 100})
    seaweedfs.restart()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert artifacts.read_artifact_file(uri, "w.bin") == b"persist" * 100
            break
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_seaweedfs_ports_leave_room_for_derived_grpc_ports():
    """SeaweedFS refuses an HTTP port that equals another service's HTTP port + 10000."""
    from rayops.s3_server import weed_ports

    pairs = weed_ports()
    http = [h for h, _ in pairs]
    grpc = [g for _, g in pairs]
    assert all(g == h + 10000 and g < 65536 for h, g in pairs)
    assert not set(http) & set(grpc)
    assert len(set(http + grpc)) == 8
