"""Logs written to a file or pipe carry no ANSI colour codes (Ray's forwarded worker-log prefixes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rayops import session

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import sys, threading
    import ray
    from rayops.session import ray_session
    from schemas.common import RaySpec

    class Recorder:  # stdout as a pipe would be: not a terminal; tells us when the actor's line arrived
        def __init__(self, real):
            self.real, self.text, self.seen = real, [], threading.Event()
        def write(self, data):
            self.text.append(data)
            if "hello-from-actor" in data:
                self.seen.set()
            return len(data)
        def flush(self):
            pass
        def isatty(self):
            return False

    recorder = Recorder(sys.stdout)
    sys.stdout = recorder

    @ray.remote(num_cpus=0)
    class Printer:
        def say(self):
            print("hello-from-actor", flush=True)

    with ray_session(RaySpec(num_cpus=1)):
        printer = Printer.remote()
        for _ in range(120):  # the log monitor forwards lines in batches: ask again until one arrives
            ray.get(printer.say.remote(), timeout=30)
            if recorder.seen.wait(timeout=1.0):
                break
    recorder.real.write("".join(recorder.text))
    """
)


@pytest.mark.timeout(300)
def test_forwarded_worker_logs_have_no_colour_codes_when_piped():
    """A driver whose stdout is a pipe prints actor lines with a plain `(Printer pid=...)` prefix."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", session.RAY_COLOR_PREFIX)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "hello-from-actor" in line]
    assert lines and lines[0].startswith("(Printer pid="), proc.stdout[-2000:]
    assert "\x1b[" not in proc.stdout and "\x1b[" not in proc.stderr


def test_colours_are_kept_on_a_terminal(monkeypatch):
    """On a terminal Ray keeps its colours; a file or pipe on either stream turns them off."""
    monkeypatch.delenv(session.RAY_COLOR_PREFIX, raising=False)
    session.apply_log_colours(stdout_is_tty=True, stderr_is_tty=True)
    assert session.RAY_COLOR_PREFIX not in os.environ
    session.apply_log_colours(stdout_is_tty=True, stderr_is_tty=False)
    assert os.environ[session.RAY_COLOR_PREFIX] == "0"


def test_user_setting_is_kept(monkeypatch):
    """A RAY_COLOR_PREFIX the user set is never overridden."""
    monkeypatch.setenv(session.RAY_COLOR_PREFIX, "1")
    session.apply_log_colours(stdout_is_tty=False, stderr_is_tty=False)
    assert os.environ[session.RAY_COLOR_PREFIX] == "1"
