"""A resumable record of every evaluation: one small JSON file per (coefficients, sample count, seed).

Trials and the driver both consult it before evaluating and write to it right after, so a search killed at
any moment and started again never repeats an evaluation that finished, even one whose Tune trial was not
yet saved in Tune's own experiment state. Each file is written atomically.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from rayops import storage
from schemas.errors import StorageNotFoundError


def evaluation_key(alphas, num_samples: int, seed: int) -> str:
    """A stable key: coefficients rounded to 1e-9, the sample count and the seed."""
    rounded = np.round(np.asarray(alphas, dtype=np.float64), 9) + 0.0  # +0.0 folds -0.0 into 0.0
    digest = hashlib.sha256(rounded.tobytes()).hexdigest()[:24]
    return f"{digest}-n{num_samples}-s{seed}"


class EvaluationStore:
    """FID results by key, persisted as files under `uri` (a directory or prefix)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.cache: dict[str, dict] = {}

    def _file(self, key: str) -> str:
        return storage.join(self.uri, f"{key}.json")

    def get(self, alphas, num_samples: int, seed: int) -> dict | None:
        """The stored result, or None."""
        key = evaluation_key(alphas, num_samples, seed)
        if key not in self.cache:
            try:
                self.cache[key] = json.loads(storage.read_bytes(self._file(key)))
            except StorageNotFoundError:
                return None
        return self.cache[key]

    def put(self, alphas, num_samples: int, seed: int, result: dict) -> None:
        """Store a result (atomically)."""
        key = evaluation_key(alphas, num_samples, seed)
        self.cache[key] = result
        storage.write_bytes(self._file(key), json.dumps(result).encode())

    def count(self) -> int:
        """How many evaluations are recorded."""
        return len(storage.list_uris(self.uri, "*.json"))
