"""One API over local paths, file:// and s3:// URIs: read, write, list, exists, delete.

Local writes are atomic (temporary file, then `os.replace`). S3 goes through boto3, whose
"standard" retry mode retries transient errors (connection refused, 5xx, throttling) with
exponential backoff a bounded number of times; what is left is translated into the project's
`StorageError` family, naming the URI and never a credential.

boto3 retries a request, not the body it streams back, so S3 reads (`read_bytes`, `read_range`,
`download_file`, `sha256_of`) run their own loop under the same policy: the same number of attempts,
the same exponential backoff; a connection that breaks mid-body resumes at the first byte not yet
delivered, with a ranged GET on the same ETag.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from rayops import s3_reads, settings
from schemas.errors import (
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageUnavailableError,
)

MULTIPART_CHUNK = 8 * 1024 * 1024
_PERMISSION_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is 'file' or 's3'; `bucket` is empty for files; `key` is a path or key."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> Path:
        """The local path of a 'file' location."""
        return Path(self.key)

    def uri(self) -> str:
        """The canonical URI."""
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key


def parse_uri(uri: str | os.PathLike) -> Location:
    """Parse a local path, file:// or s3:// URI."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not 3 <= len(bucket) <= 63:
            raise StorageError(f"invalid S3 URI {text!r}: bucket names have 3-63 characters", uri=text)
        return Location("s3", bucket, key)
    if text.startswith("file://"):
        text = text[7:]
    elif "://" in text:
        raise StorageError(
            f"unsupported URI scheme in {text!r}; use a local path, file:// or s3://", uri=text
        )
    return Location("file", "", text)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    """True for s3:// URIs."""
    return parse_uri(uri).scheme == "s3"


# --------------------------------------------------------------------------------------------- S3


@functools.lru_cache(maxsize=16)
def _client_for(
    endpoint: str | None,
    access_key: str | None,
    region: str | None,
    pid: int,
    attempts: int,
    connect_s: float,
    read_s: float,
):
    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=connect_s,
        read_timeout=read_s,
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config
    )


def s3_client(attempts: int | None = None):
    """A boto3 S3 client for the current environment (cached per endpoint, key id and process); `attempts`
    overrides LCSC_STORAGE_MAX_ATTEMPTS (1: no retries, for callers that retry themselves)."""
    return _client_for(
        settings.s3_endpoint(),
        settings.env_str("AWS_ACCESS_KEY_ID"),
        settings.env_str(settings.AWS_REGION),
        os.getpid(),
        attempts or s3_reads.max_attempts(),
        settings.env_float(settings.STORAGE_CONNECT_TIMEOUT_S, 2.0),
        settings.env_float(settings.STORAGE_READ_TIMEOUT_S, 30.0),
    )


def _translate(exc: Exception, loc: Location, action: str) -> StorageError:
    uri = loc.uri()
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _PERMISSION_CODES or status == 403:
            return StoragePermissionError(
                f"{action} {uri}: access denied ({code}) for bucket '{loc.bucket}'; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket's policy",
                uri=uri,
            )
        if code == "NoSuchBucket":
            return StorageNotFoundError(f"{action} {uri}: bucket '{loc.bucket}' does not exist", uri=uri)
        if code in _NOT_FOUND_CODES or status == 404:
            return StorageNotFoundError(f"{action} {uri}: no such object", uri=uri)
        return StorageUnavailableError(f"{action} {uri}: S3 error {code or status} after retries", uri=uri)
    if isinstance(exc, (BotoConnectionError, BotoCoreError)):
        endpoint = settings.s3_endpoint() or "the default AWS endpoint"
        return StorageUnavailableError(
            f"{action} {uri}: S3 endpoint {endpoint} unreachable after retries ({type(exc).__name__})",
            uri=uri,
        )
    return StorageError(f"{action} {uri}: {exc}", uri=uri)


def _s3_call(loc: Location, action: str, fn, *args, **kwargs):
    """Call boto3 (which retries transient errors itself); what is left becomes a `StorageError`."""
    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError, Boto3Error) as exc:
        raise _translate(exc, loc, action) from None


def _stream_s3(loc: Location, sink: s3_reads.Sink, start: int = 0, length: int | None = None) -> None:
    """Stream an S3 object's bytes into `sink`, resuming a broken body (see `rayops.s3_reads`)."""
    s3_reads.stream(s3_client(attempts=1), loc, sink, _translate, start, length)


# ------------------------------------------------------------------------------------------ public


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`; readers never see a partial local file."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        import io

        upload_fileobj(io.BytesIO(data), uri)
        return
    loc.path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=loc.path.parent, prefix=f".{loc.path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, loc.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_fileobj(handle: BinaryIO, uri: str) -> None:
    """Stream a file object to `uri` (multipart above 8 MiB on S3)."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        write_bytes(uri, handle.read())
        return
    config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
    _s3_call(loc, "write", s3_client().upload_fileobj, handle, loc.bucket, loc.key, Config=config)


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to `uri`."""
    with open(local_path, "rb") as handle:
        upload_fileobj(handle, uri)


def read_bytes(uri: str) -> bytes:
    """Read the whole object at `uri`."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            return loc.path.read_bytes()
        except FileNotFoundError:
            raise StorageNotFoundError(f"read {uri}: no such file", uri=uri) from None
        except IsADirectoryError:
            raise StorageError(f"read {uri}: is a directory, expected a file", uri=uri) from None
    chunks: list[bytes] = []
    _stream_s3(loc, chunks.append)
    return b"".join(chunks)


def read_range(uri: str, start: int, length: int) -> bytes:
    """Read at most `length` bytes of the object at `uri` from byte `start` (fewer at its end)."""
    if length <= 0:
        return b""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except FileNotFoundError:
            raise StorageNotFoundError(f"read {uri}: no such file", uri=uri) from None
        except IsADirectoryError:
            raise StorageError(f"read {uri}: is a directory, expected a file", uri=uri) from None
    chunks: list[bytes] = []
    _stream_s3(loc, chunks.append, start, length)
    return b"".join(chunks)


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy the object at `uri` to a local file (atomically: a temporary file of its own, then `os.replace`, so
    that processes caching the same object at once never mix their bytes)."""
    loc = parse_uri(uri)
    local_path = Path(local_path)
    if loc.scheme == "file" and not loc.path.is_file():
        raise StorageNotFoundError(f"read {uri}: no such file", uri=uri)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if loc.scheme == "file":
                with open(loc.path, "rb") as source:
                    shutil.copyfileobj(source, handle)
            else:
                _stream_s3(loc, handle.write)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cached copy is readable like any other file
        os.replace(tmp, local_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    """True when an object (or local file or directory) exists at `uri`."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        return loc.path.exists()
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except ClientError as exc:
        error = _translate(exc, loc, "stat")
        if isinstance(error, StorageNotFoundError) and "bucket" not in str(error):
            return False
        raise error from None
    except BotoCoreError as exc:
        raise _translate(exc, loc, "stat") from None


def list_uris(prefix: str, pattern: str | None = None, recursive: bool = True) -> list[str]:
    """URIs of the files under `prefix` (a directory or key prefix), sorted, optionally filtered by a glob
    applied to the name relative to `prefix`."""
    loc = parse_uri(prefix)
    if loc.scheme == "file":
        root = loc.path
        if not root.exists():
            return []
        files = root.rglob("*") if recursive else root.iterdir()
        rels = sorted(p.relative_to(root).as_posix() for p in files if p.is_file())
        base = prefix.rstrip("/")
    else:
        key_prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        rels = []
        paginator = s3_client().get_paginator("list_objects_v2")
        pages = _s3_call(loc, "list", lambda: list(paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix)))
        for page in pages:
            rels += [obj["Key"][len(key_prefix) :] for obj in page.get("Contents", [])]
        if not recursive:
            rels = [r for r in rels if "/" not in r]
        rels.sort()
        base = f"s3://{loc.bucket}/{key_prefix.rstrip('/')}".rstrip("/")
    if pattern:
        rels = [r for r in rels if fnmatch.fnmatch(r, pattern)]
    return [f"{base}/{r}" for r in rels]


def delete(uri: str, recursive: bool = False) -> None:
    """Delete the object at `uri`; with `recursive`, everything under it. Missing objects are fine."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        if loc.path.is_dir():
            if not recursive:
                raise StorageError(f"delete {uri}: is a directory; pass recursive=True", uri=uri)
            shutil.rmtree(loc.path)
        else:
            loc.path.unlink(missing_ok=True)
        return
    client = s3_client()
    keys = [loc.key]
    if recursive:
        keys = [parse_uri(u).key for u in list_uris(uri)] + [loc.key]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000] if k]
        if batch:
            response = _s3_call(
                loc,
                "delete",
                client.delete_objects,
                Bucket=loc.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            check_delete_response(loc, response)


def check_delete_response(loc: Location, response: dict) -> None:
    """Raise naming every key a DeleteObjects response reports as not deleted (S3 answers 200 even then);
    a key that was already gone is fine."""
    failed = [e for e in response.get("Errors", []) if e.get("Code") not in _NOT_FOUND_CODES]
    if not failed:
        return
    keys = ", ".join(
        f"s3://{loc.bucket}/{e.get('Key')} ({e.get('Code')}: {e.get('Message', '')})" for e in failed[:10]
    )
    more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
    codes = {str(e.get("Code")) for e in failed}
    cls = StoragePermissionError if codes & _PERMISSION_CODES else StorageError
    raise cls(
        f"delete {loc.uri()}: {len(failed)} object(s) were not deleted: {keys}{more}; check the "
        "bucket's policy (s3:DeleteObject) and object locks, then delete them or run again",
        uri=loc.uri(),
    )


def stat(uri: str) -> tuple[int, str | None]:
    """(size in bytes, ETag or None) of the object at `uri`; local files have no ETag."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        try:
            return loc.path.stat().st_size, None
        except FileNotFoundError:
            raise StorageNotFoundError(f"stat {uri}: no such file", uri=uri) from None
    head = _s3_call(loc, "stat", s3_client().head_object, Bucket=loc.bucket, Key=loc.key)
    return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"') or None


def sha256_of(uri: str) -> str:
    """Hex sha256 of the object at `uri`, streamed in 1 MiB blocks (local files are not read whole)."""
    import hashlib

    loc = parse_uri(uri)
    digest = hashlib.sha256()
    if loc.scheme == "file":
        try:
            with open(loc.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise StorageNotFoundError(f"read {uri}: no such file", uri=uri) from None
        return digest.hexdigest()
    _stream_s3(loc, digest.update)
    return digest.hexdigest()
