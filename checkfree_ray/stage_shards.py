"""A stage writes its own checkpoint shard: copied in memory between two steps, serialised and written from a
background thread while the next steps run (`saving.py` collects the shards into a save)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import torch
from safetensors.torch import save as save_safetensors

from schemas.errors import StorageError

FlatState = dict[str, torch.Tensor]


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes held by a flat state's tensors."""
    return sum(t.numel() * t.element_size() for t in state.values())


class ShardWriter:
    """Mixin of `StageWorker`: its checkpoint shard writes (one at a time, in the background)."""

    _writer: threading.Thread | None = None  # writes the last checkpoint shard in the background
    _written: tuple[int | None, dict | None, Exception | None] = (None, None, None)  # (step, entry, error)

    def save_shard(self, uri: str, step: int, storage_env: dict[str, str], wait_s: float = 600.0) -> int:
        """Checkpoint `step` of this stage: copy the full state in memory now (between two steps, in call order),
        then serialise and write it to `uri` from a background thread while the next steps run.

        One save at a time: a previous write still running is waited for first (up to `wait_s`). `storage_env`
        holds the driver's storage settings (endpoint, keys), so the stage writes where the driver reads.
        Returns the bytes copied; `shard_written(step)` reports the outcome.
        """
        if self._writer is not None:
            self._writer.join(timeout=wait_s)
        state = self.get_state(include_optim=True)
        os.environ.update(storage_env)
        self._written = (step, None, None)
        self._writer = threading.Thread(
            target=self._write_shard, args=(uri, step, state), daemon=True, name=f"checkpoint-{step}"
        )
        self._writer.start()
        return state_nbytes(state)

    def _write_shard(self, uri: str, step: int, state: FlatState) -> None:
        import hashlib

        from rayops import storage

        try:
            self._fault("write_shard")
            data = save_safetensors(state)
            del state  # bounded memory: the copy is freed once serialised
            storage.write_bytes(uri, data)
            self._written = (step, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, None)
        except (StorageError, OSError, RuntimeError, ValueError) as exc:  # reported by `shard_written`
            self._written = (step, None, exc)

    def shard_written(self, step: int, wait_s: float = 0.0) -> dict | None:
        """The manifest entry `{"size", "sha256"}` of this stage's shard of `step`, None while it is still being
        written (after waiting up to `wait_s`); re-raises the write's error (e.g. storage unreachable)."""
        if self._writer is not None:
            self._writer.join(timeout=wait_s)
        done, entry, error = self._written
        if done != step:
            raise RuntimeError(f"stage {self.stage_index} has no save of step {step} (its last was {done})")
        if error is not None:
            raise error
        return entry
