"""Full-model checkpoints of one run (the run's identity is `run_identity.py`).

Layout (the store owns it; nothing else reads these files):

    <checkpoint uri>/run-<run id>/checkpoint_000100/stage_000.safetensors   one shard per stage, written by
                                                   stage_001.safetensors   the stage actor itself
                                                   history.json            what the run measured up to here
                                                   MANIFEST.json           last: sizes, sha256, metadata

The directory naming follows Ray Train (`checkpoint_%06d` under a run directory), so `as_ray_checkpoint` can
hand one to Ray Train tooling. A checkpoint without its manifest is incomplete and ignored; one whose manifest
names another run is never loaded or pruned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from checkfree_ray.run_identity import RunIdentity
from rayops import storage
from rayops.artifacts import MANIFEST_NAME, MANIFEST_VERSION, read_artifact_file, read_manifest, sha256_hex
from schemas.errors import (
    CheckpointError,
    RecoveryError,
    StorageError,
)

log = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d{6,})$")
HISTORY_FILE = "history.json"


def checkpoint_dir_name(step: int) -> str:
    """Ray Train's naming: checkpoint_000100."""
    return f"checkpoint_{step:06d}"


def shard_name(stage_index: int) -> str:
    """File of one stage inside a checkpoint."""
    return f"stage_{stage_index:03d}.safetensors"


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute (stage actors may run in another working directory)."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.parse_uri(uri).key)


def storage_env(forward_credentials: bool = False) -> dict[str, str]:
    """The driver's storage settings (AWS endpoint, region, our retry knobs), passed to the stage actors that
    write shards so they write where the driver reads. The driver's keys are added only with
    `forward_credentials` (`storage.forward_credentials`): by default a stage keeps its node's own credentials
    (instance role, IRSA). Never log the result."""
    from rayops.jobs import forwarded_env

    return forwarded_env(forward_credentials)


@dataclass
class PendingSave:
    """A checkpoint in flight: the stages writing their shards, and what its manifest will hold."""

    step: int
    actors: list
    saves: list  # refs of each stage's `save_shard` (its state copied)
    metadata: dict[str, Any]
    history: dict[str, Any]
    started: float
    entries: dict[int, dict] = field(
        default_factory=dict
    )  # stage -> its shard's {"size", "sha256"}, once known
    polls: dict[int, Any] = field(default_factory=dict)  # stage -> ref of its `shard_written`, while asking


@dataclass
class Checkpoint:
    """One loaded checkpoint: verified shards, the manifest's metadata and the run's history up to its step."""

    step: int
    shards: list[bytes]
    metadata: dict[str, Any]
    history: dict[str, Any] | None


class CheckpointStore:
    """Writes, lists, reads and prunes the checkpoints of one run under one URI."""

    def __init__(self, uri: str, keep: int, run: RunIdentity | None = None):
        self.run = run or RunIdentity(uuid.uuid4().hex[:12], "")
        self.base_uri = absolute_uri(uri.rstrip("/"))
        self.uri = storage.join(self.base_uri, f"run-{self.run.run_id}")
        self.keep = keep

    def checkpoint_uri(self, step: int) -> str:
        """Directory of checkpoint `step` of this run."""
        return storage.join(self.uri, checkpoint_dir_name(step))

    def shard_uri(self, step: int, stage_index: int) -> str:
        """Where stage `stage_index` writes its shard of checkpoint `step`."""
        return storage.join(self.checkpoint_uri(step), shard_name(stage_index))

    def begin(self, step: int) -> None:
        """Before shards of `step` are written: anything of this run there (an incomplete or discarded checkpoint
        of the same step) goes, so every file found there later was written by this save."""
        storage.delete(storage.join(self.checkpoint_uri(step), MANIFEST_NAME))
        storage.delete(self.checkpoint_uri(step), recursive=True)

    def has_shard(self, step: int, stage_index: int) -> bool:
        """Whether the shard of `stage_index` in checkpoint `step` has been written (writes are atomic)."""
        return storage.exists(self.shard_uri(step, stage_index))

    def written_shard(self, step: int, stage_index: int) -> dict | None:
        """The manifest entry of a shard already written (writes are atomic), read back from storage; None when
        it is not there. For a stage lost after writing its shard, before it could report it."""
        uri = self.shard_uri(step, stage_index)
        if not storage.exists(uri):
            return None
        data = storage.read_bytes(uri)
        return {"size": len(data), "sha256": sha256_hex(data)}

    def commit(self, step: int, shards: list[dict], metadata: dict, history: dict | None = None) -> dict:
        """Write history.json, then the manifest over the shards' `{"size", "sha256"}`; prune. Returns the manifest."""
        uri = self.checkpoint_uri(step)
        files = {shard_name(i): entry for i, entry in enumerate(shards)}
        if history is not None:
            data = json.dumps(history).encode()
            storage.write_bytes(storage.join(uri, HISTORY_FILE), data)
            files[HISTORY_FILE] = {"size": len(data), "sha256": sha256_hex(data)}
        manifest = {
            "version": MANIFEST_VERSION,
            "created_unix": time.time(),
            "files": files,
            "metadata": {
                **metadata,
                "step": step,
                "num_stages": len(shards),
                "run_id": self.run.run_id,
                "fingerprint": self.run.fingerprint,
            },
        }
        storage.write_bytes(
            storage.join(uri, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True).encode()
        )
        self._prune()
        return manifest

    def save(
        self, step: int, shards: list[bytes], metadata: dict, history: dict | None = None
    ) -> tuple[str, float, int]:
        """Write one checkpoint from the driver (shards first, manifest last); returns (uri, seconds, bytes)."""
        start = time.perf_counter()
        self.begin(step)
        entries = []
        for i, shard in enumerate(shards):
            storage.write_bytes(self.shard_uri(step, i), shard)
            entries.append({"size": len(shard), "sha256": sha256_hex(shard)})
        self.commit(step, entries, metadata, history)
        return self.checkpoint_uri(step), time.perf_counter() - start, sum(len(s) for s in shards)

    def steps(self) -> list[int]:
        """Steps of this run's complete checkpoints, ascending."""
        found = set()
        for file_uri in storage.list_uris(self.uri, pattern=f"checkpoint_*/{MANIFEST_NAME}"):
            match = CHECKPOINT_PATTERN.search(file_uri.rsplit("/", 2)[-2])
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """Step of the newest complete checkpoint of this run, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int, num_stages: int) -> Checkpoint:
        """Checkpoint `step`, every file verified against the manifest; `CheckpointError` names what is wrong."""
        uri = self.checkpoint_uri(step)
        try:
            manifest = read_manifest(uri)
            meta = manifest["metadata"]
            if meta.get("run_id") != self.run.run_id:
                raise CheckpointError(
                    f"checkpoint {uri} belongs to run {meta.get('run_id')}, not {self.run.run_id}"
                )
            if meta.get("num_stages") != num_stages:
                raise CheckpointError(
                    f"checkpoint {uri} has {meta.get('num_stages')} stages, the run has {num_stages}"
                )
            shards = [read_artifact_file(uri, shard_name(i), manifest) for i in range(num_stages)]
            history = None
            if HISTORY_FILE in manifest["files"]:
                history = json.loads(read_artifact_file(uri, HISTORY_FILE, manifest))
        except (StorageError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {uri} cannot be restored: {exc}") from None
        return Checkpoint(step, shards, meta, history)

    def load_latest(self, num_stages: int, context: str = "") -> Checkpoint:
        """The newest checkpoint of this run that loads and verifies; a corrupt or incomplete one is skipped (with
        a warning) for the one before. `RecoveryError` when this run has none."""
        steps = self.steps()
        problems = []
        for step in reversed(steps):
            try:
                return self.load(step, num_stages)
            except CheckpointError as exc:
                log.warning("%s; falling back to the previous checkpoint", exc)
                problems.append(str(exc))
        raise RecoveryError(
            f"{context}{' and ' if context else ''}run {self.run.run_id} has no complete checkpoint under {self.uri}"
            + (f" ({'; '.join(problems)})" if problems else "")
            + "; set `checkpointing.every` so every strategy has one, or check the storage"
        )

    def _prune(self) -> None:
        """Keep this run's `keep` newest complete checkpoints; drop its older ones and incomplete leftovers below
        the newest. Other runs' checkpoints live under their own run directory and are never touched."""
        complete = self.steps()
        if not complete:
            return
        kept = set(complete[-self.keep :])
        present = set()
        for file_uri in storage.list_uris(self.uri):
            match = CHECKPOINT_PATTERN.search(file_uri.rsplit("/", 2)[-2])
            if match:
                present.add(int(match.group(1)))
        for step in sorted(present):
            if step not in kept and step < complete[-1]:
                storage.delete(self.checkpoint_uri(step), recursive=True)


def as_ray_checkpoint(uri: str):
    """A `ray.train.Checkpoint` for a checkpoint directory (local path or s3:// with the AWS variables)."""
    from ray.train import Checkpoint as RayCheckpoint

    return RayCheckpoint(path=uri)
