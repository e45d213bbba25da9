"""What Table 2's measurements share: the Ray and S3 server they run in, started only when a row is measured, and
the harness's rows turned back into the measured data the report reads."""

from __future__ import annotations

import contextlib

from _common import local_ray
from checkfree_setup import s3_bucket

HARNESS_KEYS = (
    "config",
    "config_key",
    "seconds_measuring",
)  # what `harness.run_sweep` adds to a measured row


class LazyCluster(contextlib.AbstractContextManager):
    """A SeaweedFS S3 server with a fresh bucket, then a local Ray with 2 CPUs, started at the first `base()` and
    stopped on exit: a rerun whose rows are all cached starts neither."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._stack = contextlib.ExitStack()
        self._base: str | None = None

    def base(self) -> str:
        """`s3://bucket` of this measurement's checkpoints (starting the server and Ray if not yet started)."""
        if self._base is None:
            self._base = self._stack.enter_context(s3_bucket(self.prefix))
            self._stack.enter_context(local_ray(num_cpus=2))
        return self._base

    def __exit__(self, *exc) -> None:
        self._stack.close()


def without_harness_keys(row: dict, *more: str) -> dict:
    """A measured row as the measurement returned it (the harness's bookkeeping keys and `more` left out)."""
    return {k: v for k, v in row.items() if k not in (*HARNESS_KEYS, *more)}
