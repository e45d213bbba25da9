"""One run per output: a lock object with an owner and a lease, taken with a conditional write.

The lock is `OUTPUT/run.lock`, a small JSON object: who holds it (host, pid, a random token), when it was taken
and until when its lease runs. It is created only if absent (S3 `PutObject` with `If-None-Match: *`; locally
a hard link, which fails when the name exists), so of two runs starting together exactly one wins. The holder
renews the lease from a background thread; a run that is killed stops renewing, and once its lease has expired
the next run takes the lock over (S3: a put conditional on the stale lock's ETag; locally: the stale file is
replaced under an exclusive `flock` of the output directory, so only one taker wins). A lock whose holder ran on
this host and no longer runs is stale at once. A second run into a running one's output is refused with an error
that names the owner.

A local renewal replaces the file atomically (`os.replace` under the directory's `flock`): there is no moment
without a lock file. Every storage error met while renewing (S3 unreachable, a read timeout, a local I/O error) is
retried until the lease runs out. The holder trusts its lock only until `_SAFETY` of its last written lease is
left, by its own clock and whatever its heartbeat thread is doing: past that, `check()` raises, so a run that
could not renew stops writing before another run may take the output over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from botocore.exceptions import BotoCoreError, ClientError

from rayops import storage
from schemas.errors import LcscCheckfreeError, StorageError, StorageNotFoundError, StorageUnavailableError

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
DEFAULT_LEASE_S = 120.0  # a killed run blocks its output for at most this long; renewed every third of it
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_SAFETY = (
    0.1  # the part of its lease a holder gives up, so a write that passed check() lands before a takeover
)
_RETRY_FRACTION = 1 / 12  # after a failed renewal the heartbeat tries again this part of a lease later
_DIR_LOCK_TIMEOUT_S = 10.0  # a local replace holds the directory's flock for microseconds


class OutputLockedError(LcscCheckfreeError):
    """Another run holds the output's lock (or took it over from this one)."""


def _write_tmp(directory: str, data: bytes) -> str:
    """A complete, synced temporary file beside the lock; the caller links or renames it into place."""
    tmp = os.path.join(directory, f".{LOCK_NAME}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def _local_create(path: str, data: bytes) -> bool:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = _write_tmp(directory, data)
    try:
        os.link(tmp, path)  # atomic, and fails if the lock exists: the holder's content is complete
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def _directory_locked(directory: str, timeout_s: float = _DIR_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on the output directory: local replaces and removals of the lock take turns."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageUnavailableError(
                        f"{directory}: its lock {LOCK_NAME} stayed busy (flock held by another process) for "
                        f"{timeout_s:.0f} s; find the process that holds it (`lsof {directory}`)",
                        uri=directory,
                    ) from None
                time.sleep(0.001)
        yield
    finally:
        os.close(fd)  # releases the flock


def _is_conflict(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in _CONFLICT_CODES or status in _CONFLICT_CODES


class OutputLock:
    """The lock of one output URI. Use as a context manager: acquire, renew in the background, release."""

    def __init__(
        self,
        output_uri: str,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        what: str = "run",
    ):
        self.uri = storage.join(output_uri, LOCK_NAME)
        self.output_uri, self.lease_s, self.clock, self.what = output_uri, float(lease_s), clock, what
        self.token = uuid.uuid4().hex
        self.version: str | None = (
            None  # the ETag (S3) or content (local) of the lock as this holder wrote it
        )
        self.taken_over: dict | None = None  # the stale lock this holder replaced, if any
        self.lost: str | None = None
        self._valid_until: float | None = (
            None  # by self.clock: the lease this holder last wrote, less _SAFETY
        )
        self._last_error: str | None = None  # the last storage error that kept the heartbeat from renewing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------- content
    def _payload(self, now: float) -> bytes:
        return json.dumps(
            {
                "owner": f"{socket.gethostname()}:{os.getpid()}",
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start": _start_time(os.getpid()),
                "token": self.token,
                "what": self.what,
                "renewed_at": now,
                "expires_at": now + self.lease_s,
                "lease_s": self.lease_s,
            }
        ).encode()

    def _read(self) -> tuple[dict, str] | None:
        """(lock content, version) or None when there is no lock."""
        loc = storage.parse_uri(self.uri)
        if loc.scheme == "file":
            try:
                data = loc.path.read_bytes()
            except FileNotFoundError:
                return None
            return self._parse(data), data.decode(errors="replace")
        try:
            response = storage.s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
            data = response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage._translate(exc, loc, "read lock") from None
        except (BotoCoreError, OSError) as exc:  # endpoint unreachable, timed out, or the body broke
            raise storage._translate(exc, loc, "read lock") from None
        return self._parse(data), response["ETag"]

    def _parse(self, data: bytes) -> dict:
        try:
            info = json.loads(data)
        except ValueError:
            info = None
        if not isinstance(info, dict) or "expires_at" not in info:
            # not ours to judge: treat as held until its file is fixed or removed by hand
            return {"owner": f"an unreadable lock object ({len(data)} bytes)", "expires_at": float("inf")}
        return info

    # --------------------------------------------------------------------------- conditional writes
    def _create(self, data: bytes) -> bool:
        loc = storage.parse_uri(self.uri)
        if loc.scheme == "file":
            created = _local_create(str(loc.path), data)
            self.version = data.decode() if created else None
            return created
        try:
            response = storage.s3_client().put_object(
                Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*"
            )
        except ClientError as exc:
            if _is_conflict(exc):
                return False
            raise storage._translate(exc, loc, "create lock") from None
        except BotoCoreError as exc:
            raise storage._translate(exc, loc, "create lock") from None
        self.version = response["ETag"]
        return True

    def _replace(self, data: bytes, expected: str) -> bool:
        """Overwrite the lock only if it is still the version `expected`; True when this call won."""
        loc = storage.parse_uri(self.uri)
        if loc.scheme == "file":
            return self._local_replace(str(loc.path), data, expected)
        try:
            response = storage.s3_client().put_object(
                Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=expected
            )
        except ClientError as exc:
            if _is_conflict(exc) or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise storage._translate(exc, loc, "replace lock") from None
        except BotoCoreError as exc:
            raise storage._translate(exc, loc, "replace lock") from None
        self.version = response["ETag"]
        return True

    def _local_replace(self, path: str, data: bytes, expected: str) -> bool:
        """Compare and swap under the directory's flock; `os.replace` leaves no moment without a lock file."""
        directory = os.path.dirname(path)
        tmp = _write_tmp(directory, data)
        try:
            with _directory_locked(directory):
                try:
                    current = Path(path).read_bytes().decode(errors="replace")
                except FileNotFoundError:
                    return False
                if current != expected:  # someone else replaced it since we read it
                    return False
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.version = data.decode()
        return True

    def _local_remove(self, path: str) -> None:
        """Remove the local lock if it is still this holder's (under the flock, so never a successor's)."""
        with _directory_locked(os.path.dirname(path)):
            current = self._read()
            if current is not None and current[0].get("token") == self.token:
                os.unlink(path)

    def _held_since(self, now: float) -> None:
        """Record a lease this holder wrote at `now` (its clock, read before the write: never too late)."""
        self._valid_until = now + self.lease_s * (1 - _SAFETY)

    def _lease_ran_out(self) -> bool:
        return self._valid_until is not None and self.clock() >= self._valid_until

    def _not_renewed_message(self) -> str:
        cause = self._last_error or "the renewal did not finish in time"
        return (
            f"the lease of its lock {self.uri} ran out at {_when(self._valid_until)} and was not renewed "
            f"({cause}); another run may take the output over now"
        )

    # ------------------------------------------------------------------------------------- public
    def acquire(self) -> None:
        """Take the lock, or take over a lock whose lease has expired; else raise naming the owner."""
        for _attempt in range(3):  # a lock released or replaced between our read and write: look again
            now = self.clock()
            if self._create(self._payload(now)):
                self._held_since(now)
                return
            current = self._read()
            if current is None:
                continue
            info, version = current
            if (
                info.get("token") == self.token
            ):  # our create landed but its answer was lost: the lease is ours
                self._valid_until = float(info["expires_at"]) - self.lease_s * _SAFETY
                return
            if float(info["expires_at"]) > self.clock() and not _holder_gone(info):
                raise OutputLockedError(self._held_message(info))
            now = self.clock()
            if self._replace(self._payload(now), version):
                self._held_since(now)
                self.taken_over = info
                log.warning(
                    "took over the stale lock of %s on %s (its lease expired at %s)",
                    info.get("owner"),
                    self.output_uri,
                    _when(info["expires_at"]),
                )
                return
        raise OutputLockedError(
            f"{self.output_uri}: could not take its lock {self.uri}: other runs keep "
            "taking it; make sure only one run writes this output"
        )

    def _held_message(self, info: dict) -> str:
        left = float(info["expires_at"]) - self.clock()
        return (
            f"{self.output_uri} is in use by another {info.get('what', 'run')} ({info.get('owner')}; its lease "
            f"runs until {_when(info['expires_at'])}, {left:.0f} s from now, and is renewed while it runs); "
            "wait for it to finish, give this run another `output.uri`, or, if that run is gone, delete "
            f"{self.uri} (or wait until its lease expires)"
        )

    def renew(self) -> None:
        """Extend the lease; raises OutputLockedError when another run took the lock over or the lease ran out
        before this renewal (a lost lock stays lost), and StorageError when the storage could not be reached."""
        if self.lost:
            raise OutputLockedError(self.lost)
        now = self.clock()
        current = self._read()
        if current is None or current[0].get("token") != self.token:
            owner = "nobody" if current is None else current[0].get("owner")
            self.lost = f"the lock {self.uri} of this {self.what} is now held by {owner}"
            raise OutputLockedError(self.lost)
        if self._lease_ran_out():
            self.lost = self._not_renewed_message()
            raise OutputLockedError(self.lost)
        if not self._replace(self._payload(now), current[1]):
            self.lost = f"the lock {self.uri} was replaced while this {self.what} renewed it"
            raise OutputLockedError(self.lost)
        self._held_since(now)
        self._last_error = None

    def release(self) -> None:
        """Remove the lock if this holder still owns it."""
        loc = storage.parse_uri(self.uri)
        if loc.scheme == "file":
            if loc.path.parent.is_dir():
                self._local_remove(str(loc.path))
            return
        current = self._read()
        if current is not None and current[0].get("token") == self.token:
            try:
                storage.delete(self.uri)
            except StorageNotFoundError:
                return

    def check(self) -> None:
        """Raise if the lock was lost, or its lease ran out unrenewed (checked before results are written)."""
        if self.lost is None and self._lease_ran_out():
            self.lost = self._not_renewed_message()
        if self.lost:
            raise OutputLockedError(
                f"{self.output_uri}: {self.lost}; this {self.what} stops without writing "
                "(what it wrote so far stays; run it again to resume)"
            )

    def _heartbeat(self) -> None:
        wait = self.lease_s / 3
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.lease_s / 3
            except OutputLockedError as exc:
                log.error("%s", exc)
                return
            except (
                StorageError,
                OSError,
            ) as exc:  # retried until renewed or the lease runs out (check() says so)
                self._last_error = f"{type(exc).__name__}: {exc}"
                wait = self.lease_s * _RETRY_FRACTION
                log.warning("could not renew the lock %s (retrying in %.1f s): %s", self.uri, wait, exc)

    def __enter__(self) -> Self:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="output-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost is not None or self._lease_ran_out():  # it may be a successor's now: leave it alone
            log.warning("left the lock %s in place: %s", self.uri, self.lost or self._not_renewed_message())
            return
        try:
            self.release()
        except StorageError as exc:  # never hide the run's own outcome; the lock expires with its lease
            log.warning(
                "could not remove the lock %s (%s); it expires at %s",
                self.uri,
                exc,
                _when(self._valid_until or 0.0),
            )


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_gone(info: dict) -> bool:
    """True when the lock was taken on this host by a process that no longer runs (killed, crashed): its lock
    is stale at once, without waiting for the lease (a holder on another host is judged by its lease only)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user runs under that pid
    start = _start_time(pid)
    return start is not None and info.get("pid_start") is not None and start != info["pid_start"]


def _when(epoch: float) -> str:
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(epoch))) if epoch != float("inf") else "never"
    )
