"""Failure injection for stages (the test harness and the chaos benchmarks; a run never arms a fault): a stage
killed (SIGKILL, as a lost node would end it) or hung at an exact point of a step."""

from __future__ import annotations

import os
import signal
import threading
import time


class FaultInjection:
    """Mixin of `StageWorker`: `terminate`, `arm_fault`, and the `_fault(call)` hook its calls run as they start."""

    faults: dict[str, tuple[str, float, int]]  # call -> (action, seconds, skip)
    _writer: threading.Thread | None

    def terminate(self) -> None:
        """Failure injection: SIGKILL this process (no cleanup), as a lost node would end it.

        A checkpoint shard this stage is still writing is finished first (bounded), so a kill scheduled between
        two steps lands between them; `arm_fault("write_shard")` kills a stage in the middle of its save."""
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=60.0)
        os.kill(os.getpid(), signal.SIGKILL)

    def arm_fault(self, call: str, action: str = "kill", seconds: float = 0.0, skip: int = 0) -> None:
        """Failure-injection harness (tests only; a run never arms one): the (`skip`+1)-th next call of `call`
        ('forward', 'backward', 'grad_sq_norm', 'step', 'get_state', 'configure',
        'write_shard') dies ('kill', SIGKILL) or hangs ('hang',
        `seconds`) as it starts, so that a stage can be lost at an exact point of a step. A 'kill' waits `seconds`
        first, so that the replies of the calls before it reach their callers (on crowded cores a reply still queued
        when the process dies is lost with it, and the stage then looks lost one call earlier)."""
        if action not in ("kill", "hang"):
            raise ValueError(f"unknown fault action {action!r}; use 'kill' or 'hang'")
        self.faults[call] = (action, seconds, skip)

    def _fault(self, call: str) -> None:
        if call not in self.faults:
            return
        action, seconds, skip = self.faults[call]
        if skip > 0:
            self.faults[call] = (action, seconds, skip - 1)
            return
        del self.faults[call]
        time.sleep(seconds)
        if action == "kill":
            self.terminate()
