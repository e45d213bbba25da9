"""Checkpoint saves off the critical path: the stages write their own shards while the next steps run.

The executor starts a save after a commit (`CheckpointSaver.start`); each stage copies its state in memory in
call order (between that step and the next), then writes its own shard to storage from a background thread.
The driver only asks, after each later step, whether every shard is written (`finish` with `wait_s` 0), and
writes the manifest last once every shard's size and sha256 came back. A failed save (storage outage, a stage
lost while writing) logs a warning and leaves the previous checkpoint as the latest; the next save tries again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from checkfree_ray.checkpoint_store import CheckpointStore, PendingSave, storage_env
from checkfree_ray.timeouts import SAVE_TIMEOUT_S
from schemas.errors import StorageError

if TYPE_CHECKING:
    from checkfree_ray.history import History

log = logging.getLogger(__name__)


class CheckpointSaver:
    """At most one save in flight for one run's `CheckpointStore`; its costs go to `history.costs`."""

    def __init__(self, store: CheckpointStore, history: History):
        self.store, self.history = store, history
        self.pending: PendingSave | None = None

    def start(self, step: int, actors: list, metadata: dict[str, Any], history: dict[str, Any]) -> None:
        """Start saving `step`: each stage writes its shard in the background (after the previous save is done:
        one at a time). `metadata` and `history` go into the manifest."""
        if self.pending is not None:
            self.finish(wait_s=SAVE_TIMEOUT_S)
        started = time.perf_counter()
        try:
            self.store.begin(step)
        except StorageError as exc:
            self._failed(step, f"storage: {exc}")
            return
        env = storage_env()
        saves = [
            a.save_shard.remote(self.store.shard_uri(step, i), step, env, SAVE_TIMEOUT_S)
            for i, a in enumerate(actors)
        ]
        self.pending = PendingSave(step, list(actors), saves, metadata, history, started)

    def finish(self, wait_s: float) -> None:
        """Write the manifest of the save in flight once every shard is written. With `wait_s` 0 this only asks
        the stages (the answers are read at the next call); otherwise it waits up to `wait_s` for the writes."""
        pending = self.pending
        if pending is None:
            return
        errors = self._collect_shards(pending, wait_s)
        if not errors and len(pending.entries) < len(pending.actors):
            if wait_s == 0:
                return  # still writing: ask again after the next step
            errors.append(f"shards not written within {wait_s:.0f}s")
        self.pending = None
        for ref in pending.saves:  # read (expected) errors so Ray does not report them as unhandled
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref, timeout=0)
        if errors:
            self._failed(pending.step, "; ".join(errors))
            return
        entries = [pending.entries[i] for i in range(len(pending.actors))]
        try:
            self.store.commit(pending.step, entries, pending.metadata, pending.history)
        except StorageError as exc:
            self._failed(pending.step, f"storage: {exc}")
            return
        costs = self.history.costs
        costs["checkpoint_bytes"] = float(sum(e["size"] for e in entries))
        costs["checkpoint_saves"] = costs.get("checkpoint_saves", 0.0) + 1
        costs["checkpoint_save_s_total"] = (
            costs.get("checkpoint_save_s_total", 0.0) + time.perf_counter() - pending.started
        )

    def phase_of_lost(self, stage: int, phase: str) -> str:
        """'checkpoint_save' for a stage lost between steps before its shard of the save in flight was written;
        else `phase` unchanged."""
        pending = self.pending
        if phase != "before_step" or pending is None or stage in pending.entries:
            return phase
        try:
            written = self.store.has_shard(pending.step, stage)
        except StorageError:
            written = False
        return phase if written else "checkpoint_save"

    def _collect_shards(self, pending: PendingSave, wait_s: float) -> list[str]:
        """Read the stages' answers about their shards into `pending.entries`, and ask those still writing again
        (with `wait_s` > 0, a question that waits in the stage). Returns the errors (the save failed)."""
        errors = self._read_shard_answers(pending, timeout=0)
        for _round in range(2 if wait_s > 0 else 1):
            for stage, actor in enumerate(pending.actors):
                if stage not in pending.entries and stage not in pending.polls:
                    pending.polls[stage] = actor.shard_written.remote(pending.step, wait_s)
            if wait_s > 0:
                errors += self._read_shard_answers(pending, timeout=wait_s + 30.0)
        return errors

    def _read_shard_answers(self, pending: PendingSave, timeout: float) -> list[str]:
        """Read the answers that arrive within `timeout`; a stage lost after writing its shard is read back from
        storage. Returns the errors."""
        errors, refs = [], list(pending.polls.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        for stage, ref in list(pending.polls.items()):
            if ref not in ready:
                continue
            del pending.polls[stage]
            try:
                entry = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                try:
                    entry = self.store.written_shard(pending.step, stage)
                except StorageError as exc:
                    errors.append(f"stage {stage}: {exc}")
                    continue
                if entry is None:
                    errors.append(f"stage {stage} was lost before its shard was written")
            except ray.exceptions.RayError as exc:
                errors.append(f"stage {stage}: {str(exc).strip().splitlines()[-1]}")
                continue
            if entry is not None:
                pending.entries[stage] = entry
        return errors

    def _failed(self, step: int, why: str) -> None:
        costs = self.history.costs
        costs["checkpoint_failed_saves"] = costs.get("checkpoint_failed_saves", 0.0) + 1
        log.warning(
            "checkpoint %d was not saved (%s); training goes on and the next save tries again", step, why
        )
