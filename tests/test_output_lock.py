"""One run per output: the lock object is taken atomically, refused while held, taken over once stale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rayops import storage
from rayops.output_lock import LOCK_NAME, OutputLock, OutputLockedError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output URI on the local disk, or in a fresh SeaweedFS bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/run"


class Clock:
    """A settable clock, so lease expiry is tested without waiting."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_second_run_is_refused_naming_the_owner(output):
    """While one run holds the lock, a second is refused with the owner's pid; after release it may take it."""
    first = OutputLock(output, lease_s=60)
    first.acquire()
    with pytest.raises(OutputLockedError, match=rf"in use by another run \(.*:{os.getpid()};.*delete .*{LOCK_NAME}"):
        OutputLock(output, lease_s=60).acquire()
    first.release()
    assert not storage.exists(storage.join(output, LOCK_NAME))
    second = OutputLock(output, lease_s=60)
    second.acquire()
    assert json.loads(storage.read_bytes(storage.join(output, LOCK_NAME)))["token"] == second.token


def test_stale_lock_is_taken_over_once_and_the_old_holder_learns_it(output):
    """A lock whose lease expired is taken over by exactly one of two runs; its old holder's renew fails."""
    clock = Clock()
    old = OutputLock(output, lease_s=10, clock=clock)
    old.acquire()
    clock.now += 5
    with pytest.raises(OutputLockedError):
        OutputLock(output, lease_s=10, clock=clock).acquire()  # lease still running
    clock.now += 6
    takers = [OutputLock(output, lease_s=10, clock=clock) for _ in range(2)]
    takers[0].acquire()
    assert takers[0].taken_over["token"] == old.token
    with pytest.raises(OutputLockedError):
        takers[1].acquire()  # the new lock is fresh
    with pytest.raises(OutputLockedError, match="now held by"):
        old.renew()
    takers[0].renew()


def test_racing_runs_one_wins(output):
    """Eight threads creating the lock at once: exactly one holds it."""
    locks = [OutputLock(output, lease_s=60) for _ in range(8)]
    barrier, wins = threading.Barrier(8), []

    def take(lock):
        barrier.wait(timeout=30)
        try:
            lock.acquire()
            wins.append(lock.token)
        except OutputLockedError:
            pass

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(wins) == 1
    assert json.loads(storage.read_bytes(storage.join(output, LOCK_NAME)))["token"] == wins[0]


HOLDER = """
import sys, threading
from rayops.output_lock import OutputLock
with OutputLock(sys.argv[1], lease_s=float(sys.argv[2])):
    print("held", flush=True)
    threading.Event().wait(600)
"""


def test_killed_holder_lock_is_taken_over_at_once_on_its_host(tmp_path):
    """A process killed with SIGKILL while holding the lock (long lease) leaves it stale at once on its own host:
    the next run takes it over, recording whose it was."""
    output = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, output, "600"], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(OutputLockedError, match=f":{proc.pid};"):
        OutputLock(output, lease_s=60).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lock = OutputLock(output, lease_s=60)
    lock.acquire()
    assert lock.taken_over is not None and lock.taken_over["pid"] == proc.pid


def test_a_lock_from_another_host_waits_for_its_lease(tmp_path):
    """A lock written on another host is judged by its lease alone (its pid means nothing here)."""
    clock = Clock()
    path = tmp_path / "out" / LOCK_NAME
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"owner": "elsewhere:1", "host": "elsewhere", "pid": 999999, "token": "x",
                                "expires_at": clock.now + 30}))
    with pytest.raises(OutputLockedError, match="elsewhere:1"):
        OutputLock(str(tmp_path / "out"), clock=clock).acquire()
    clock.now += 31
    lock = OutputLock(str(tmp_path / "out"), clock=clock)
    lock.acquire()
    assert lock.taken_over["owner"] == "elsewhere:1"
