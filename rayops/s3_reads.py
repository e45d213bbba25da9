"""Resumable S3 reads: boto3 retries a request, not the body it streams back; this loop retries both.

A read is a series of GETs under the storage retry policy (LCSC_STORAGE_MAX_ATTEMPTS attempts, exponential
backoff as in botocore's standard mode). When a connection resets, times out or is cut short mid-body, the next
GET asks for the first byte not yet delivered (`Range`) of the same version (`If-Match` on the first answer's
ETag, and the ETag checked again), so the bytes handed to the sink are exactly the object's, once each.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from rayops import settings
from schemas.errors import StorageError, StorageUnavailableError


class Location(Protocol):
    """Where an S3 object lives (`rayops.storage.Location` satisfies it; named here so reads need no storage)."""

    bucket: str
    key: str

    def uri(self) -> str: ...


Sink = Callable[[bytes], object]
Translate = Callable[[Exception, "Location", str], StorageError]

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestLimitExceeded",
}
_TRANSIENT_BOTO = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
)  # refused, reset, timed out, cut short
_READ_CHUNK = (
    8 << 20
)  # a break loses at most this much; smaller pieces cost CPU in copies (benchmarks/s3_resumable_reads.py)
_MAX_BACKOFF_S = 20.0  # botocore's standard retry mode caps its backoff at 20 s too


def max_attempts() -> int:
    """LCSC_STORAGE_MAX_ATTEMPTS (default 4): attempts per request, and failed GETs in a row per read."""
    return max(1, settings.env_int(settings.STORAGE_MAX_ATTEMPTS, 4))


class _Broken(Exception):
    """A GET or its body failed in a way worth retrying (the cause is `__cause__`)."""


@dataclass
class _Cursor:
    """Where a read stands: the next byte to deliver, the end (exclusive; None until the object's size is
    known) and the ETag every piece must come from."""

    offset: int
    end: int | None
    etag: str | None = None


def _backoff_s(failures: int) -> float:
    """The wait before retry `failures` (1, 2, ...): exponential with base 2, capped at 20 s, as in botocore's
    standard retry mode; its jitter is kept to the upper half so that a few retries span a server's restart."""
    return min(_MAX_BACKOFF_S, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return isinstance(exc, _TRANSIENT_BOTO)


def _object_end(response: dict, cursor: _Cursor) -> int:
    """The end of what this read wants, clipped to the object's size (from Content-Range or Content-Length)."""
    content_range = response.get("ContentRange")
    size = (
        int(content_range.rsplit("/", 1)[1])
        if content_range
        else cursor.offset + int(response["ContentLength"])
    )
    return size if cursor.end is None else min(cursor.end, size)


def _get_piece(client, loc: Location, cursor: _Cursor, sink: Sink, translate: Translate) -> None:
    """One GET from `cursor.offset`, streamed into `sink` chunk by chunk; `cursor` follows what was delivered."""
    kwargs = {"IfMatch": cursor.etag} if cursor.etag else {}
    if cursor.offset or cursor.end is not None:
        kwargs["Range"] = f"bytes={cursor.offset}-{'' if cursor.end is None else cursor.end - 1}"
    try:
        response = client.get_object(Bucket=loc.bucket, Key=loc.key, **kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "InvalidRange" and cursor.etag is None:  # the read starts at or past the object's end
            cursor.end = cursor.offset
            return
        if code == "PreconditionFailed":
            raise StorageError(
                f"read {loc.uri()}: the object was replaced while it was read (ETag {cursor.etag} "
                "is gone); read it again",
                uri=loc.uri(),
            ) from None
        raise (_Broken() if _is_transient(exc) else translate(exc, loc, "read")) from exc
    except BotoCoreError as exc:
        raise (_Broken() if _is_transient(exc) else translate(exc, loc, "read")) from exc
    if cursor.etag is not None and response.get("ETag") != cursor.etag:  # a server that ignores If-Match
        raise StorageError(
            f"read {loc.uri()}: the object was replaced while it was read (ETag {cursor.etag} became "
            f"{response.get('ETag')}); read it again",
            uri=loc.uri(),
        )
    cursor.etag, cursor.end = response.get("ETag"), _object_end(response, cursor)
    body = response["Body"]
    while cursor.offset < cursor.end:
        try:
            chunk = body.read(min(_READ_CHUNK, cursor.end - cursor.offset))
        except (BotoCoreError, OSError) as exc:  # reset, timed out or cut short mid-body
            raise _Broken() from exc
        if not chunk:
            raise _Broken() from IncompleteReadError(actual_bytes=cursor.offset, expected_bytes=cursor.end)
        sink(chunk)
        cursor.offset += len(chunk)


def stream(
    client, loc: Location, sink: Sink, translate: Translate, start: int = 0, length: int | None = None
) -> None:
    """Stream bytes [start, start + length) of an S3 object (to its end when `length` is None) into `sink`.

    A GET that fails transiently, or whose body breaks, is retried after a backoff and resumes at the first byte
    not yet delivered; LCSC_STORAGE_MAX_ATTEMPTS failures in a row without a new byte end the read with an error
    naming the URI. Errors that retrying cannot fix (403, 404) are raised as `translate` makes them. `client`
    must not retry by itself (boto3 `max_attempts` 1): this loop is the policy."""
    cursor, attempts, failures = _Cursor(start, None if length is None else start + length), max_attempts(), 0
    while True:
        reached = cursor.offset
        try:
            _get_piece(client, loc, cursor, sink, translate)
            return
        except _Broken as broken:
            failures = 1 if cursor.offset > reached else failures + 1
            if failures >= attempts:
                cause = broken.__cause__
                endpoint = settings.s3_endpoint() or "the default AWS endpoint"
                state = "unreachable" if isinstance(cause, _TRANSIENT_BOTO) else "failing"
                raise StorageUnavailableError(
                    f"read {loc.uri()}: S3 endpoint {endpoint} {state} after retries ({attempts} attempts in a row "
                    f"failed, stopped at byte {cursor.offset}; last: {type(cause).__name__}: {cause}); check that "
                    f"it is up, or raise {settings.STORAGE_MAX_ATTEMPTS} to wait longer",
                    uri=loc.uri(),
                ) from None
            time.sleep(_backoff_s(failures))
