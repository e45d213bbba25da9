"""The identity of a training run: its run id (kept across resumes) and the fingerprint of its spec and inputs.

    <output uri>/run.json     the run's identity: run id, spec fingerprint, its inputs, status

A rerun of the same spec into the same output resumes the run found in `run.json`; a different spec is refused
unless the caller restarts (new run id). The checkpoint store (`checkpoint_store.py`) files each run's checkpoints
under its run id, so a checkpoint of another run is never loaded or pruned.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rayops import storage
from rayops.identity import describe_changes, digest
from schemas.errors import CheckpointError, RunConflictError, StorageNotFoundError

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Spec fields that say where and how Ray runs the stages, not what is computed: a resume may change them.
PLACEMENT_FIELDS = {
    "ray": None,
    "output": None,
    "checkpointing": ("uri",),
    "pipeline": ("placement", "num_cpus_per_stage", "warm_standby", "standby_actors", "peak_flops"),
    "recovery": ("drain_poll_s",),  # a hand-off on a notice is exact: how often to look changes nothing
    "storage": None,
}  # whose credentials the stages use changes no value


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
