"""One run per output: the lock object is taken atomically, refused while held, taken over once stale."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
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
    with pytest.raises(
        OutputLockedError, match=rf"in use by another run \(.*:{os.getpid()};.*delete .*{LOCK_NAME}"
    ):
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
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, output, "600"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
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
    path.write_text(
        json.dumps(
            {
                "owner": "elsewhere:1",
                "host": "elsewhere",
                "pid": 999999,
                "token": "x",
                "expires_at": clock.now + 30,
            }
        )
    )
    with pytest.raises(OutputLockedError, match="elsewhere:1"):
        OutputLock(str(tmp_path / "out"), clock=clock).acquire()
    clock.now += 31
    lock = OutputLock(str(tmp_path / "out"), clock=clock)
    lock.acquire()
    assert lock.taken_over["owner"] == "elsewhere:1"


def test_local_renew_never_leaves_the_lock_missing(tmp_path):
    """Renewing a local lock replaces it atomically: a reader never finds it missing and a contender never wins."""
    output = str(tmp_path / "out")
    lock = OutputLock(output, lease_s=60)
    lock.acquire()
    path = Path(output) / LOCK_NAME
    stop, missing, foreign, contender_wins = threading.Event(), [], [], []

    def read_lock():
        while not stop.is_set():
            try:
                token = json.loads(path.read_bytes())["token"]
            except FileNotFoundError:
                missing.append(1)
                continue
            if token != lock.token:
                foreign.append(token)

    def contend():
        while not stop.is_set():
            try:
                OutputLock(output, lease_s=60).acquire()
                contender_wins.append(1)
            except OutputLockedError:
                continue

    threads = [threading.Thread(target=read_lock), threading.Thread(target=contend)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(300):
            lock.renew()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert (len(missing), len(foreign), len(contender_wins)) == (0, 0, 0)
    assert sorted(p.name for p in Path(output).iterdir()) == [LOCK_NAME]  # no temporary files left behind


class CuttableProxy:
    """A TCP forwarder in front of the S3 server; while `cut()`, every connection through it is reset at once, so
    clients using it find the endpoint gone while clients that dial the server directly still reach it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.blocked = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # the listener was closed by close()
                return
            if self.blocked:
                client.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )  # RST on close
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:  # either side was closed: the connection is over
            return

    def cut(self) -> None:
        """Reset the open connections and every new one until `restore()`."""
        self.blocked = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets = []

    def restore(self) -> None:
        """Forward new connections again."""
        self.blocked = False

    def close(self) -> None:
        """Stop listening."""
        self.cut()
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close() alone would not
        self.listener.close()


def stored_lock(server, bucket_uri: str) -> dict:
    """The lock object as the server holds it, read directly (not through the proxy)."""
    body = server.client().get_object(Bucket=bucket_uri[5:], Key="run/" + LOCK_NAME)["Body"].read()
    return json.loads(body)


SECOND_OWNER = """
import json, sys, time
from rayops.output_lock import OutputLock, OutputLockedError
refused, deadline = 0, time.time() + float(sys.argv[2])
while time.time() < deadline:
    lock = OutputLock(sys.argv[1], lease_s=60)
    try:
        lock.acquire()
    except OutputLockedError:
        refused += 1
        time.sleep(0.1)
        continue
    print(json.dumps({"taken_at": time.time(), "refused": refused, "token": lock.token,
                      "taken_over": (lock.taken_over or {}).get("token")}), flush=True)
    break
"""


def test_lease_not_renewed_through_network_errors_is_lost_before_another_owner_takes_it(
    s3_bucket, seaweedfs, monkeypatch
):
    """With the endpoint unreachable for the holder only, its check() raises once its lease runs out, and a second
    owner (which reaches S3) is refused until then, takes the lock after, and the old holder never deletes it."""
    output = f"{s3_bucket}/run"
    direct_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proxy = CuttableProxy(int(seaweedfs.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # this process's S3 traffic goes through the proxy
    lease_s = 4.0
    with OutputLock(output, lease_s=lease_s) as holder:
        acquired_at = time.time()
        proxy.cut()
        second = subprocess.Popen(
            [sys.executable, "-c", SECOND_OWNER, output, "30"],
            cwd=ROOT,
            env=direct_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        lost_at = None
        while lost_at is None and time.time() < acquired_at + 20:
            try:
                holder.check()
                time.sleep(0.02)
            except OutputLockedError as exc:
                lost_at = time.time()
                message = str(exc)
        out, _ = second.communicate(timeout=60)
    assert lost_at is not None, "the holder's check() still passed long after its lease ran out"
    assert lost_at < acquired_at + lease_s + 0.5
    assert "not renewed" in message and output in message
    taken = json.loads(out)
    assert taken["refused"] >= 1 and taken["taken_over"] == holder.token
    assert lost_at <= taken["taken_at"]
    assert stored_lock(seaweedfs, s3_bucket)["token"] == taken["token"]  # the old holder's exit left it alone
    proxy.close()


def test_heartbeat_retries_through_a_short_outage_and_keeps_the_lease(s3_bucket, seaweedfs, monkeypatch):
    """Connections reset for longer than a heartbeat but shorter than the lease: the heartbeat keeps retrying,
    renews once the endpoint answers again, and the holder never loses its lock."""
    proxy = CuttableProxy(int(seaweedfs.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    lease_s = 6.0  # the outage (2.6 s) outlasts a heartbeat (2 s) and leaves 3.4 s to renew on loaded cores
    with OutputLock(f"{s3_bucket}/run", lease_s=lease_s) as holder:
        first_expiry = stored_lock(seaweedfs, s3_bucket)["expires_at"]
        proxy.cut()
        time.sleep(lease_s / 3 + 0.6)  # the first beat meets the reset connections
        proxy.restore()
        time.sleep(lease_s)  # past the first lease: only a renewal keeps it
        holder.check()
        renewed_expiry = stored_lock(seaweedfs, s3_bucket)["expires_at"]
    assert holder.lost is None
    assert renewed_expiry > first_expiry + lease_s / 3
    proxy.close()
