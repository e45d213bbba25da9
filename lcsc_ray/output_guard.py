"""The driver's guard on its output: a search whose output lock was lost stops before its next state write.

`run_search` registers its `OutputLock.check` for the output URI while it holds the lock (`guarding`); the
driver-side parts that write state or hear of results (Tune's callback, the proposal record, the pool's
scoring loop) call an `OutputGuard`, which runs that check. The guard holds only the URI, so Tune can pickle it
with the callbacks and searcher of an experiment; a callback that Tune restores from an earlier run's snapshot
checks the lock of the run that resumes it. Outside `guarding` (tests, benchmarks) a guard never raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Guard = Callable[[], None]  # raises when the driver may no longer write its state
_CHECKS: dict[str, Guard] = {}  # output URI -> the check of the lock this process holds on it


class OutputGuard:
    """Runs the check registered for `output_uri` (nothing when none is): raises what it raises."""

    def __init__(self, output_uri: str | None = None):
        self.output_uri = output_uri

    def __call__(self) -> None:
        check = _CHECKS.get(self.output_uri or "")
        if check is not None:
            check()


@contextlib.contextmanager
def guarding(output_uri: str, check: Guard) -> Iterator[OutputGuard]:
    """Register `check` (e.g. `OutputLock.check`) as the guard of `output_uri` for the duration."""
    _CHECKS[output_uri] = check
    try:
        yield OutputGuard(output_uri)
    finally:
        _CHECKS.pop(output_uri, None)
