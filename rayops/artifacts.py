"""Directory-like artifacts (a checkpoint, a result) that readers see whole or not at all.

Writing: every data file first, `MANIFEST.json` (names, sizes, sha256, metadata) last. Overwriting
deletes the old manifest before any data file changes. Reading: an artifact without a manifest is
incomplete; every file read back is checked against its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rayops import storage
from schemas.errors import ChecksumError, IncompleteArtifactError, StateFileError, StorageNotFoundError

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
MANIFEST_MAX_BYTES = 64 * 1024 * 1024  # a manifest lists names, sizes and hashes: megabytes at most
STATE_JSON_MAX_BYTES = 256 * 1024 * 1024
RESTART_HINT = "start over with `--restart`, or give the run another `output.uri`"


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def write_artifact(
    uri: str,
    files: dict[str, bytes | Path],
    metadata: dict[str, Any] | None = None,
    keep_old_manifest: bool = False,
) -> dict:
    """Write `files` (name -> bytes or local path) under `uri`, then the manifest. Returns the manifest.

    With `keep_old_manifest` (a result that must stay complete), the old manifest is replaced only by the new
    one: until then readers see the old artifact, and a file already rewritten fails its checksum instead of
    mixing versions silently."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not keep_old_manifest:
        storage.delete(manifest_uri)  # the old version stops being complete before any file changes
    entries = {}
    for name, content in files.items():
        if name == MANIFEST_NAME:
            raise ValueError(f"{MANIFEST_NAME} is reserved for the artifact manifest")
        target = storage.join(uri, name)
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            storage.write_bytes(target, data)
            entries[name] = {"size": len(data), "sha256": sha256_hex(data)}
        else:
            size, digest = _file_sha256(Path(content))
            storage.upload_file(content, target)
            entries[name] = {"size": size, "sha256": digest}
    manifest = {
        "version": MANIFEST_VERSION,
        "created_unix": time.time(),
        "files": entries,
        "metadata": metadata or {},
    }
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(uri: str) -> dict:
    """The manifest of a complete artifact; `IncompleteArtifactError` when files exist without one or it is
    corrupt (checked before anything it lists is read)."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        raw = _read_bounded(manifest_uri, MANIFEST_MAX_BYTES)
    except StateFileError as exc:
        raise IncompleteArtifactError(
            f"artifact {uri}: {MANIFEST_NAME} is corrupt ({exc})", uri=uri
        ) from None
    except StorageNotFoundError:
        if storage.list_uris(uri):
            raise IncompleteArtifactError(
                f"artifact {uri} is incomplete: it has data files but no {MANIFEST_NAME} (its writer died or "
                "is still writing); re-run the step that writes it",
                uri=uri,
            ) from None
        raise StorageNotFoundError(f"no artifact at {uri}", uri=uri) from None
    problem = None
    try:
        manifest = json.loads(raw)
        problem = _manifest_problem(manifest)
    except (ValueError, RecursionError) as exc:
        problem = f"not JSON ({exc})"
    if problem:
        raise IncompleteArtifactError(
            f"artifact {uri}: {MANIFEST_NAME} is corrupt ({problem}); re-run the step that writes it", uri=uri
        )
    return manifest


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "no `files` object"
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict):
            return f"entry {name!r} is not an object"
        size, digest = entry.get("size"), entry.get("sha256")
        if type(size) is not int or size < 0:
            return f"entry {name!r} has size {size!r}"
        if not isinstance(digest, str) or len(digest) != 64:
            return f"entry {name!r} has no sha256"
    return None


def _read_bounded(uri: str, max_bytes: int) -> bytes:
    """The whole object at `uri`, refused (before reading) when it is larger than `max_bytes`."""
    size, _ = storage.stat(uri)
    if size > max_bytes:
        raise StateFileError(
            f"{uri} is {size} bytes, over the {max_bytes}-byte limit for this kind of file; "
            "it is not a file this project wrote"
        )
    return storage.read_bytes(uri)


def is_complete(uri: str) -> bool:
    """True when the artifact at `uri` has a manifest."""
    return storage.exists(storage.join(uri, MANIFEST_NAME))


def read_artifact_file(uri: str, name: str, manifest: dict | None = None) -> bytes:
    """Read one file of a complete artifact and verify its size and sha256."""
    manifest = manifest or read_manifest(uri)
    entry = manifest["files"].get(name)
    if entry is None:
        raise StorageNotFoundError(
            f"artifact {uri} has no file {name!r}; it has {sorted(manifest['files'])}", uri=uri
        )
    file_uri = storage.join(uri, name)
    size, _ = storage.stat(file_uri)
    if size != entry["size"]:  # checked before reading: a manifest never makes us read more than it lists
        raise ChecksumError(
            f"{file_uri}: {size} bytes, the manifest lists {entry['size']}; the file is corrupt "
            "or was changed after the artifact was written",
            uri=file_uri,
        )
    data = storage.read_bytes(file_uri)
    if len(data) != entry["size"] or sha256_hex(data) != entry["sha256"]:
        raise ChecksumError(
            f"{file_uri}: size or sha256 differs from the manifest ({len(data)} bytes, expected {entry['size']}); "
            "the file is corrupt or was changed after the artifact was written",
            uri=file_uri,
        )
    return data


def read_artifact(uri: str) -> tuple[dict[str, bytes], dict]:
    """Every file of a complete artifact (verified), and its manifest."""
    manifest = read_manifest(uri)
    return {name: read_artifact_file(uri, name, manifest) for name in manifest["files"]}, manifest


def download_artifact(uri: str, local_dir: str | Path) -> dict:
    """Copy a complete artifact's files into `local_dir`, verifying each; returns the manifest."""
    manifest = read_manifest(uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (local_dir / name).write_bytes(read_artifact_file(uri, name, manifest))
    return manifest


def write_json(uri: str, payload: Any) -> None:
    """Write a JSON document atomically (single object)."""
    storage.write_bytes(uri, json.dumps(payload, indent=2, sort_keys=False, default=str).encode())


def read_json(uri: str, hint: str = "the file is corrupt", max_bytes: int = STATE_JSON_MAX_BYTES) -> Any:
    """Read a JSON document; a corrupt or oversized one is a `StateFileError` naming the file and `hint`."""
    data = _read_bounded(uri, max_bytes)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StateFileError(f"{uri} is not valid JSON ({exc}); {hint}") from None


def read_state_json(uri: str) -> Any:
    """Read a JSON state or result file of a run being resumed; a corrupt one names the file and how to
    start over."""
    return read_json(uri, RESTART_HINT)
