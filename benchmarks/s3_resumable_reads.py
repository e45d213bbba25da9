"""Resumable S3 reads against boto3's own reads, on a real SeaweedFS server on loopback: seconds per read.

`rayops.storage` reads S3 bodies in 8 MiB pieces through its own retry loop (so a body that breaks resumes at the
byte it reached), and `download_file` streams one GET to a temporary file instead of s3transfer's parallel ranged
GETs. This measures what that costs when nothing breaks: each round reads the same object four ways, interleaved
(boto3 `get_object().read()`, `storage.read_bytes`, boto3 `download_file`, `storage.download_file`), and the
ratios of the medians are printed and written to `benchmarks/results/s3_resumable_reads.json`.

    nice -n 10 .venv/bin/python benchmarks/s3_resumable_reads.py [--mib 64] [--rounds 7] [--quick]

Runtime: about a minute on 2 cores; --quick (16 MiB, 3 rounds; written to outputs/bench/quick/) a few seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import QUICK_RESULTS, RESULTS, machine_info, write_json

from rayops import storage
from rayops.s3_server import start_seaweedfs


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def ways(uri: str, expected: bytes, scratch: Path) -> dict:
    """The four reads of `uri`, each checking it got `expected`."""
    loc = storage.parse_uri(uri)
    client = storage.s3_client()

    def boto_read():
        assert client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read() == expected

    def storage_read():
        assert storage.read_bytes(uri) == expected

    def boto_download():
        client.download_file(loc.bucket, loc.key, str(scratch / "boto.bin"))
        assert (scratch / "boto.bin").stat().st_size == len(expected)

    def storage_download():
        storage.download_file(uri, scratch / "ours.bin")
        assert (scratch / "ours.bin").stat().st_size == len(expected)

    return {
        "boto3 get_object().read()": boto_read,
        "storage.read_bytes": storage_read,
        "boto3 download_file (s3transfer)": boto_download,
        "storage.download_file": storage_download,
    }


def main() -> None:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="object size in MiB")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument(
        "--quick", action="store_true", help="16 MiB, 3 rounds, written to outputs/bench/quick/"
    )
    args = parser.parse_args()
    mib, rounds = (16, 3) if args.quick else (args.mib, args.rounds)
    server = start_seaweedfs()
    try:
        os.environ.update(server.env())
        server.create_bucket("bench-reads")
        payload = os.urandom(mib << 20)
        uri = "s3://bench-reads/object.bin"
        storage.write_bytes(uri, payload)
        with tempfile.TemporaryDirectory() as scratch:
            reads = ways(uri, payload, Path(scratch))
            seconds = {name: [] for name in reads}
            for _ in range(rounds):
                for name, fn in reads.items():
                    seconds[name].append(timed(fn))
    finally:
        server.stop()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratios = {
        "read_bytes / boto3 read": medians["storage.read_bytes"] / medians["boto3 get_object().read()"],
        "download_file / boto3 download_file": medians["storage.download_file"]
        / medians["boto3 download_file (s3transfer)"],
    }
    print(f"{mib} MiB object, {rounds} interleaved rounds, SeaweedFS on loopback")
    for name, median in medians.items():
        print(f"  {name:34s} median {median:6.3f} s  ({mib / median:7.1f} MiB/s)")
    for name, ratio in ratios.items():
        print(f"  {name:40s} {ratio:5.2f}x")
    target = (QUICK_RESULTS if args.quick else RESULTS) / "s3_resumable_reads.json"
    write_json(
        target,
        {
            "mib": mib,
            "rounds": rounds,
            "seconds": seconds,
            "medians_s": medians,
            "ratios": ratios,
            "machine": machine_info(),
        },
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
