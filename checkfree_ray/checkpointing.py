"""Full-model checkpoints of one run, and the run's identity.

Layout (the store owns it; nothing else reads these files):

    <checkpoint uri>/run-<run id>/checkpoint_000100/stage_000.safetensors   one shard per stage, written by
                                                   stage_001.safetensors   the stage actor itself
                                                   history.json            what the run measured up to here
                                                   MANIFEST.json           last: sizes, sha256, metadata
    <output uri>/run.json                          the run's identity: run id, spec fingerprint, its inputs

The directory naming follows Ray Train (`checkpoint_%06d` under a run directory), so `as_ray_checkpoint` can
hand one to Ray Train tooling. A checkpoint without its manifest is incomplete and ignored; one whose manifest
names another run is never loaded or pruned. A rerun of the same spec into the same output resumes the run
found in `run.json`; a different spec is refused unless the caller restarts (new run id).
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

from rayops import storage
from rayops.artifacts import MANIFEST_NAME, MANIFEST_VERSION, read_artifact_file, read_manifest, sha256_hex
from rayops.identity import describe_changes, digest
from schemas.errors import (
    CheckpointError,
    RecoveryError,
    RunConflictError,
    StorageError,
    StorageNotFoundError,
)

log = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d{6,})$")
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
# Spec fields that say where and how Ray runs the stages, not what is computed: a resume may change them.
PLACEMENT_FIELDS = {
    "ray": None,
    "output": None,
    "checkpointing": ("uri",),
    "pipeline": ("placement", "num_cpus_per_stage", "warm_standby", "standby_actors", "peak_flops"),
    "recovery": ("drain_poll_s",),  # a hand-off on a notice is exact: how often to look changes nothing
    "storage": None,
}  # whose credentials the stages use changes no value


def checkpoint_dir_name(step: int) -> str:
    """Ray Train's naming: checkpoint_000100."""
    return f"checkpoint_{step:06d}"


def shard_name(stage_index: int) -> str:
    """File of one stage inside a checkpoint."""
    return f"stage_{stage_index:03d}.safetensors"


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute (stage actors may run in another working directory)."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.parse_uri(uri).key)


# ----- run identity --------------------------------------------------------------------------------------------
def spec_inputs(spec) -> dict[str, Any]:
    """The fingerprint entries of a training spec: each section of the spec minus where-Ray-runs fields. Fields
    at their default are left out, so a field added in a later release (at its default) does not make a run
    recorded before it look like another run; setting it, or changing any set field, does."""
    dumped = spec.model_dump(mode="json", exclude_defaults=True)
    entries = {}
    for section, value in dumped.items():
        dropped = PLACEMENT_FIELDS.get(section, ())
        if dropped is None:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in dropped}
        entries[f"spec.{section}"] = value
    from checkfree_ray.data import data_input_entries
    from checkfree_ray.hf_llama import model_input_entries

    return (
        entries | model_input_entries(spec.model) | data_input_entries(spec.data)
    )  # the files' contents too


@dataclass(frozen=True)
class RunIdentity:
    """Who a checkpoint belongs to: a run id (kept across resumes) and the spec fingerprint."""

    run_id: str
    fingerprint: str
    inputs: dict[str, Any] = field(default_factory=dict, compare=False)
    resumed: bool = False  # True when `run.json` already named this run (a rerun of the same spec)
    finished: bool = False  # True when that run already wrote its result


def new_identity(spec) -> RunIdentity:
    """A fresh run of `spec` (nothing recorded)."""
    inputs = spec_inputs(spec)
    return RunIdentity(uuid.uuid4().hex[:12], digest(inputs), inputs)


def open_run(spec, restart: bool = False) -> RunIdentity:
    """The run of `spec` in `spec.output.uri`: resumed when `run.json` names the same spec, new when there is none
    (or `restart`); `RunConflictError` naming the run found and the fix when the spec differs."""
    current = new_identity(spec)
    record_uri = storage.join(spec.output.uri, RUN_FILE)
    try:
        record = json.loads(storage.read_bytes(record_uri))
    except StorageNotFoundError:
        record = None
    except ValueError:
        raise CheckpointError(f"{record_uri} is not valid JSON; delete it or rerun with --restart") from None
    if record is not None and not restart:
        if record.get("fingerprint") != current.fingerprint:
            changes = describe_changes(record.get("inputs", {}), current.inputs) or ["the spec fingerprint"]
            raise RunConflictError(
                f"{spec.output.uri} holds run {record.get('run_id')} ('{record.get('name')}', started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.get('created_unix', 0)))}) of a "
                f"different spec ({'; '.join(changes)}). Rerun with --restart to start a new run there (the old "
                "run's checkpoints are left in place, never loaded), or set another `output.uri`"
            )
        return RunIdentity(
            record["run_id"],
            current.fingerprint,
            current.inputs,
            resumed=True,
            finished=record.get("status") == "finished",
        )
    if record is not None:
        log.warning(
            "restarting: run %s in %s is left in place and never loaded",
            record.get("run_id"),
            spec.output.uri,
        )
    write_run_record(spec, current, status="running")
    return current


def write_run_record(spec, run: RunIdentity, status: str, **extra: Any) -> None:
    """Write `run.json` (the run's identity and status) into the output."""
    record = {
        "run_id": run.run_id,
        "fingerprint": run.fingerprint,
        "inputs": run.inputs,
        "name": spec.name,
        "status": status,
        "created_unix": time.time(),
        **extra,
    }
    storage.write_bytes(storage.join(spec.output.uri, RUN_FILE), json.dumps(record, indent=2).encode())


# ----- checkpoints ---------------------------------------------------------------------------------------------
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
