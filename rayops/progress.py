"""Progress lines for long work: one readable line per update interval, in a terminal and in job logs alike.

A plain line (not a redrawn bar) reads correctly in `ray job logs`, CI logs and terminals.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float | None) -> str:
    """'1h02m', '3m05s', '12s', or '?' for unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressLine:
    """Prints `desc done/total (pct) key=value ... elapsed ETA` at most every `interval_s` seconds."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        interval_s: float = 2.0,
        stream: TextIO | None = None,
        logger: logging.Logger | None = None,
    ):
        self.desc, self.total, self.interval_s = desc, total, interval_s
        self.stream = stream  # None: sys.stderr at print time (keeps the object picklable)
        self.logger = logger
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.start = time.monotonic()
        self._last_print = float("-inf")

    def eta_s(self) -> float | None:
        """Seconds left, extrapolated from the rate so far."""
        if not self.total or self.done <= 0:
            return None
        elapsed = time.monotonic() - self.start
        return elapsed / self.done * (self.total - self.done)

    def render(self) -> str:
        """The current line."""
        parts = [self.desc]
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100.0 * self.done / self.total:.0f}%)")
        else:
            parts.append(str(self.done))
        parts += [f"{key}={_format_value(value)}" for key, value in self.fields.items()]
        parts.append(f"elapsed={format_duration(time.monotonic() - self.start)}")
        if self.total:
            parts.append(f"eta={format_duration(self.eta_s())}")
        return " ".join(parts)

    def update(self, done: int | None = None, advance: int = 0, force: bool = False, **fields: Any) -> None:
        """Set or advance the count, merge fields, and print if the interval has passed (or `force`)."""
        self.done = done if done is not None else self.done + advance
        self.fields.update(fields)
        now = time.monotonic()
        if force or now - self._last_print >= self.interval_s or (self.total and self.done >= self.total):
            self._last_print = now
            self.emit(self.render())

    def emit(self, line: str) -> None:
        """Print a line (also used for one-off events such as a failure and its recovery)."""
        if self.logger is not None:
            self.logger.info(line)
        else:
            print(line, file=self.stream or sys.stderr, flush=True)
