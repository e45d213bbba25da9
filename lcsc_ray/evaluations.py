"""A resumable record of the driver's own evaluations (fidelity re-scores, final scores).

Each evaluation is keyed by its coefficients, sample count and seed; the record is rewritten atomically
after every new entry, so a search killed mid-way re-runs none that finished.
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
    digest = hashlib.sha256(rounded.tobytes()).hexdigest()[:20]
    return f"{digest}:{num_samples}:{seed}"


class EvaluationStore:
    """FID results by key, persisted at `uri` (a JSON file)."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.entries: dict[str, dict] = json.loads(storage.read_bytes(uri))
        except StorageNotFoundError:
            self.entries = {}

    def get(self, alphas, num_samples: int, seed: int) -> dict | None:
        """The stored result, or None."""
        return self.entries.get(evaluation_key(alphas, num_samples, seed))

    def remember(self, alphas, num_samples: int, seed: int, result: dict) -> None:
        """Hold a result known from elsewhere (a Tune trial) without rewriting the record."""
        self.entries.setdefault(evaluation_key(alphas, num_samples, seed), result)

    def put(self, alphas, num_samples: int, seed: int, result: dict) -> None:
        """Store a result and persist the record atomically."""
        self.entries[evaluation_key(alphas, num_samples, seed)] = result
        storage.write_bytes(self.uri, json.dumps(self.entries).encode())
