"""S3 calls go through the translating wrapper (ranged reads included) and DeleteObjects' per-key errors count."""

from __future__ import annotations

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from lcsc_ray.checkpoints import list_checkpoints
from rayops import storage
from schemas.errors import CheckpointError, StorageError, StorageNotFoundError
from schemas.search import CheckpointSetSpec


def test_ranged_reads_on_s3(s3_bucket):
    """read_range returns the asked bytes, fewer at the end, none past it; a missing key is not-found."""
    uri = f"{s3_bucket}/r.bin"
    storage.write_bytes(uri, bytes(range(100)))
    assert storage.read_range(uri, 10, 5) == bytes(range(10, 15))
    assert storage.read_range(uri, 95, 50) == bytes(range(95, 100))
    assert storage.read_range(uri, 100, 8) == b""
    with pytest.raises(StorageNotFoundError, match="nothere.bin"):
        storage.read_range(f"{s3_bucket}/nothere.bin", 0, 8)


def test_empty_checkpoint_on_s3_is_named_not_a_botocore_error(s3_bucket):
    """An empty .safetensors object on S3 (a ranged GET the server refuses) is a CheckpointError naming it."""
    for name, data in (("ckpt_1.safetensors", b""), ("ckpt_2.safetensors", b"garbage!")):
        storage.write_bytes(f"{s3_bucket}/run/{name}", data)
    try:
        list_checkpoints(CheckpointSetSpec(uri=f"{s3_bucket}/run"))
    except (ClientError, BotoCoreError) as exc:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"a raw botocore error escaped: {exc!r}")
    except CheckpointError as exc:
        assert "ckpt_1.safetensors is truncated" in str(exc)
    else:
        pytest.fail("an empty checkpoint was accepted")


def test_delete_objects_per_key_errors_are_raised(s3_bucket):
    """DeleteObjects answers 200 with per-key errors; delete raises naming each key that was kept."""
    uris = [f"{s3_bucket}/d/{n}.bin" for n in ("a", "b", "c")]
    for uri in uris:
        storage.write_bytes(uri, b"x")
    client = storage.s3_client()

    def refuse_b(parsed, **_):  # the server's answer, with the per-key error S3 gives a locked object
        parsed.setdefault("Errors", []).append(
            {"Key": "d/b.bin", "Code": "AccessDenied", "Message": "object is under legal hold"}
        )

    client.meta.events.register("after-call.s3.DeleteObjects", refuse_b)
    try:
        with pytest.raises(StorageError) as info:
            storage.delete(f"{s3_bucket}/d", recursive=True)
    finally:
        client.meta.events.unregister("after-call.s3.DeleteObjects", refuse_b)
    assert f"{s3_bucket}/d/b.bin (AccessDenied" in str(info.value)
    assert "a.bin" not in str(info.value)
    assert not storage.exists(uris[0])  # the server really deleted the others


def test_delete_of_missing_keys_is_fine(s3_bucket):
    """Deleting keys that do not exist is not an error (per-key NoSuchKey is ignored)."""
    storage.delete(f"{s3_bucket}/never/written.bin")
    storage.write_bytes(f"{s3_bucket}/x/1.bin", b"1")
    storage.delete(f"{s3_bucket}/x", recursive=True)
    assert storage.list_uris(f"{s3_bucket}/x") == []
