"""S3 reads that break mid-body (the real SeaweedFS server killed with SIGKILL while a large object streams) resume
under the storage retry policy and return the exact bytes; a server that stays down is a clear error naming the
URI."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from botocore.response import StreamingBody

from rayops import s3_reads, settings, storage
from schemas.errors import StorageError, StorageUnavailableError

# Larger than what the loopback socket buffers can hold ahead of the reader (Linux autotunes a receive buffer up
# to tcp_rmem's maximum, 32 MiB here, plus the server's send buffer): at 32 MiB, a reader slowed by loaded cores
# could find the whole body buffered before the kill, and no break to resume from.
SIZE = 96 * 1024 * 1024
KILL_AFTER = 4 * 1024 * 1024  # bytes delivered to the reader before the server is killed
BYTES_PER_S = 40e6  # the slowed body stream, so that the kill lands mid-body


class SlowBodies:
    """Slows every S3 response body to BYTES_PER_S and signals once KILL_AFTER bytes have been read."""

    def __init__(self, monkeypatch):
        self.delivered, self.bodies = 0, set()
        self.started = threading.Event()
        real_read = StreamingBody.read

        def slow_read(body, amt=None):
            if amt is None:  # a whole-body read, done in pieces so that it can be slowed and broken
                parts = []
                while chunk := slow_read(body, 1 << 20):
                    parts.append(chunk)
                return b"".join(parts)
            chunk = real_read(body, amt)
            time.sleep(len(chunk) / BYTES_PER_S)
            self.bodies.add(id(body))
            self.delivered += len(chunk)
            if self.delivered >= KILL_AFTER:
                self.started.set()
            return chunk

        monkeypatch.setattr(StreamingBody, "read", slow_read)


def read_in_thread(how: str, uri: str, tmp_path: Path) -> tuple[threading.Thread, dict]:
    """Start the read (`read_bytes` or `download_file`); the returned dict gets 'data' or 'error'."""
    outcome: dict = {}

    def run():
        try:
            if how == "read_bytes":
                outcome["data"] = storage.read_bytes(uri)
            else:
                storage.download_file(uri, tmp_path / "cache" / "big.bin")
                outcome["data"] = (tmp_path / "cache" / "big.bin").read_bytes()
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("how", ["read_bytes", "download_file"])
def test_read_survives_server_killed_mid_body_and_restarted(how, s3_bucket, seaweedfs, monkeypatch, tmp_path):
    """The server is SIGKILLed mid-body and restarted: the read resumes and returns the exact bytes."""
    payload = os.urandom(SIZE)
    uri = f"{s3_bucket}/big/{how}.bin"
    storage.write_bytes(uri, payload)
    monkeypatch.setenv(settings.STORAGE_MAX_ATTEMPTS, "8")
    slow = SlowBodies(monkeypatch)
    thread, outcome = read_in_thread(how, uri, tmp_path)
    try:
        assert slow.started.wait(timeout=60), "the read never started"
        seaweedfs.kill()
        killed_at = slow.delivered
        time.sleep(1.0)  # the first retries meet a server that is down
    finally:
        seaweedfs.restart()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert killed_at < SIZE and seaweedfs.process.poll() is None  # the kill really landed mid-body
    assert len(slow.bodies) >= 2  # the body was requested again after the break
    assert slow.delivered == SIZE  # ... from the byte it reached: no byte was read twice
    assert outcome["data"] == payload
    if how == "download_file":
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["big.bin"]  # no temporary file left


def test_read_against_a_server_that_stays_down_names_the_uri(s3_bucket, seaweedfs, monkeypatch):
    """The server is SIGKILLed mid-body and stays down: after the retries the error names the URI."""
    uri = f"{s3_bucket}/big/down.bin"
    storage.write_bytes(uri, os.urandom(SIZE))
    monkeypatch.setenv(settings.STORAGE_MAX_ATTEMPTS, "2")
    slow = SlowBodies(monkeypatch)
    thread, outcome = read_in_thread("read_bytes", uri, Path("/nonexistent"))
    try:
        assert slow.started.wait(timeout=60), "the read never started"
        seaweedfs.kill()
        thread.join(timeout=120)
    finally:
        seaweedfs.restart()
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, StorageUnavailableError), repr(error)
    assert uri in str(error) and "attempts" in str(error)


def test_object_replaced_between_a_break_and_the_resume_is_an_error_not_mixed_bytes(
    s3_bucket, seaweedfs, monkeypatch
):
    """The object is overwritten after its body broke: the resumed read refuses to splice two versions."""
    from botocore.exceptions import ResponseStreamingError

    uri = f"{s3_bucket}/big/replaced.bin"
    storage.write_bytes(uri, b"a" * (3 << 20))
    monkeypatch.setattr(s3_reads, "_READ_CHUNK", 1 << 20)
    real_read, chunks = StreamingBody.read, []

    def read_then_break(body, amt=None):
        chunk = real_read(body, amt)
        chunks.append(len(chunk))
        if len(chunks) == 2:  # one chunk delivered: a new version lands, then the connection breaks
            seaweedfs.client().put_object(Bucket=s3_bucket[5:], Key="big/replaced.bin", Body=b"b" * (3 << 20))
            raise ResponseStreamingError(error="connection reset by peer")
        return chunk

    monkeypatch.setattr(StreamingBody, "read", read_then_break)
    with pytest.raises(StorageError, match=r"big/replaced.bin: the object was replaced while it was read"):
        storage.read_bytes(uri)
    assert chunks == [1 << 20, 1 << 20]  # the resumed GET (from byte 1 MiB) was refused before any byte
    monkeypatch.setattr(StreamingBody, "read", real_read)
    assert storage.read_bytes(uri) == b"b" * (3 << 20)
