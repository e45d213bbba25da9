"""Run identity: a fingerprint of every input a run depends on, checked before anything stored is reused.

Both engines describe their inputs as a flat mapping `name -> entry`, where an entry is a small JSON-able dict:
a file's `{"uri", "size", "sha256"}` (or `"etag"` on S3, which avoids reading the object), a plug-in's
`{"target", "kwargs"}`, or any other value that must not change under a resumed run. The digest of the whole
mapping keys the run's stored evaluations or checkpoints; `describe_changes` names what differs between a
stored fingerprint and the current one, so the error a user sees says exactly what changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rayops import storage

HASH_BLOCK = 1 << 20


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(entries: dict[str, Any]) -> str:
    """Hex sha256 of a fingerprint mapping (key order does not matter)."""
    return hashlib.sha256(_canonical(entries)).hexdigest()


def file_entry(uri: str, **extra: Any) -> dict[str, Any]:
    """The identity of one file: URI, size and a content hash (sha256 locally; ETag plus size on S3).

    `extra` (e.g. `step=`) is recorded beside it."""
    size, etag = storage.stat(uri)
    entry: dict[str, Any] = {"uri": uri, "size": size}
    if etag is not None:
        entry["etag"] = etag
    else:
        entry["sha256"] = storage.sha256_of(uri)
    entry.update(extra)
    return entry


def plugin_entry(
    target: str, kwargs: dict[str, Any] | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The identity of a plug-in: its import path and keyword arguments, and the revision it declares (a
    `lcsc_revision` attribute, changed when the same call starts giving other results)."""
    entry = {"target": target, "kwargs": kwargs or {}}
    if revision is not None:
        entry["revision"] = revision
    return entry


def describe_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable lines naming each entry that was added, removed or changed (and which of its fields)."""
    lines = []
    for name in sorted(set(stored) | set(current)):
        if name not in stored:
            lines.append(f"{name}: new input")
        elif name not in current:
            lines.append(f"{name}: no longer an input")
        elif _canonical(stored[name]) != _canonical(current[name]):
            before, after = stored[name], current[name]
            if isinstance(before, dict) and isinstance(after, dict):
                fields = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                lines.append(f"{name}: {', '.join(fields)} changed")
            else:
                lines.append(f"{name}: changed")
    return lines
