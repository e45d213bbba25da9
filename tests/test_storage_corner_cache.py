"""Several processes filling one local cache file from S3 at once (workers on one node loading the same
checkpoint or data shard): each download has a temporary file of its own, so every one succeeds and the cached
file is exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rayops import storage

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD = """
import sys
from rayops import storage
for _ in range(int(sys.argv[3])):
    storage.download_file(sys.argv[1], sys.argv[2])
print("ok", flush=True)
"""


def test_concurrent_downloads_to_one_cache_path_all_succeed(s3_bucket, tmp_path):
    """Four processes download the same object to the same path five times each: all succeed, the file is exact,
    and no temporary file is left beside it."""
    payload = os.urandom(3 << 20)
    uri = f"{s3_bucket}/cache/shard.bin"
    storage.write_bytes(uri, payload)
    target = tmp_path / "cache" / "shard.bin"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD, uri, str(target), "5"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [err[-400:] for _, err in results]
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.bin"]
