"""Full-model checkpoints: one safetensors shard per stage under `<uri>/checkpoint_000100/`, manifest last.

The directory naming follows Ray Train (`checkpoint_%06d`), so `as_ray_checkpoint` can hand one to Ray
Train tooling as a `ray.train.Checkpoint`. A checkpoint without its manifest is incomplete and ignored.
"""

from __future__ import annotations

import re
import time

from rayops import storage
from rayops.artifacts import MANIFEST_NAME, is_complete, read_artifact_file, read_manifest, write_artifact
from schemas.errors import CheckpointError

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d{6,})$")


def checkpoint_dir_name(step: int) -> str:
    """Ray Train's naming: checkpoint_000100."""
    return f"checkpoint_{step:06d}"


def shard_name(stage_index: int) -> str:
    """File of one stage inside a checkpoint."""
    return f"stage_{stage_index:03d}.safetensors"


class CheckpointStore:
    """Writes, lists, reads and prunes the run's checkpoints under one URI."""

    def __init__(self, uri: str, keep: int):
        self.uri, self.keep = uri.rstrip("/"), keep

    def save(self, step: int, shards: list[bytes], metadata: dict) -> tuple[str, float, int]:
        """Write one checkpoint (shards first, manifest last), prune old ones; returns (uri, seconds, bytes)."""
        start = time.perf_counter()
        uri = storage.join(self.uri, checkpoint_dir_name(step))
        files = {shard_name(i): shard for i, shard in enumerate(shards)}
        write_artifact(uri, files, metadata={**metadata, "step": step, "num_stages": len(shards)})
        self._prune()
        return uri, time.perf_counter() - start, sum(len(s) for s in shards)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        found = set()
        for file_uri in storage.list_uris(self.uri, pattern=f"checkpoint_*/{MANIFEST_NAME}"):
            match = CHECKPOINT_PATTERN.search(file_uri.rsplit("/", 2)[-2])
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int, num_stages: int) -> list[bytes]:
        """The verified shards of checkpoint `step`."""
        uri = storage.join(self.uri, checkpoint_dir_name(step))
        if not is_complete(uri):
            raise CheckpointError(f"checkpoint {uri} has no {MANIFEST_NAME}; it is incomplete and cannot be restored")
        manifest = read_manifest(uri)
        if manifest["metadata"].get("num_stages") != num_stages:
            raise CheckpointError(
                f"checkpoint {uri} has {manifest['metadata'].get('num_stages')} stages, the run has {num_stages}; "
                "point `checkpointing.uri` at this run's own checkpoints"
            )
        return [read_artifact_file(uri, shard_name(i), manifest) for i in range(num_stages)]

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            storage.delete(storage.join(self.uri, checkpoint_dir_name(step)), recursive=True)


def as_ray_checkpoint(uri: str):
    """A `ray.train.Checkpoint` for a checkpoint directory (local path or s3:// with the AWS variables)."""
    from ray.train import Checkpoint

    return Checkpoint(path=uri)
