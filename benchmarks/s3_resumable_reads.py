"""Resumable S3 reads against boto3's own reads, on a real SeaweedFS server on loopback: seconds per read.

`rayops.storage` reads S3 bodies in 8 MiB pieces through its own retry loop (so a body that breaks resumes at the
byte it reached), and `download_file` streams one GET to a temporary file instead of s3transfer's parallel ranged
GETs. This measures what that costs when nothing breaks: each round reads the same object four ways, interleaved
(boto3 `get_object().read()`, `storage.read_bytes`, boto3 `download_file`, `storage.download_file`), and the
ratios of the medians are printed and written to `benchmarks/results/s3_resumable_reads.json`.

    nice -n 10 .venv/bin/python benchmarks/s3_resumable_reads.py [--mib 64] [--seeds 0 1 2 3 4 5 6] [--quick]

Rounds are the harness's seeds.

Runtime: about a minute on 2 cores; --quick (16 MiB, 3 rounds; written to outputs/bench/quick/) a few seconds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from rayops import storage
from rayops.s3_server import start_seaweedfs

BOTO_READ, OUR_READ = "boto3 get_object().read()", "storage.read_bytes"
BOTO_DOWNLOAD, OUR_DOWNLOAD = "boto3 download_file (s3transfer)", "storage.download_file"


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
        BOTO_READ: boto_read,
        OUR_READ: storage_read,
        BOTO_DOWNLOAD: boto_download,
        OUR_DOWNLOAD: storage_download,
    }


def main() -> None:
    """Measure, print the table, write the JSON."""
    cli = harness.parser(__doc__, seeds=range(7), quick_seeds=range(3))
    cli.add_argument("--mib", type=int, default=None, help="object size in MiB (default 64; quick 16)")
    args = cli.parse_args()
    mib = args.mib or (16 if args.quick else 64)
    record = harness.run_record(args)
    server = start_seaweedfs()
    try:
        os.environ.update(server.env())
        server.create_bucket("bench-reads")
        payload = os.urandom(mib << 20)
        uri = "s3://bench-reads/object.bin"
        storage.write_bytes(uri, payload)
        with tempfile.TemporaryDirectory() as scratch:
            reads = ways(uri, payload, Path(scratch))
            sweep = harness.Sweep(
                "s3_resumable_reads",
                configs={name: name for name in reads},
                seeds=harness.chosen_seeds(args),
                measure=lambda name, _name, _round: {"seconds": timed(reads[name])},
                describe=f"one read of a {mib} MiB object four ways per round (= seed), SeaweedFS on loopback",
            )
            rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # timings are never reused
    finally:
        server.stop()
    seconds = {name: [r["seconds"] for r in rows if r["config"] == name] for name in sweep.configs}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratios = {
        "read_bytes / boto3 read": medians[OUR_READ] / medians[BOTO_READ],
        "download_file / boto3 download_file": medians[OUR_DOWNLOAD] / medians[BOTO_DOWNLOAD],
    }
    for name, median in medians.items():
        print(f"  {name:34s} median {median:6.3f} s  ({mib / median:7.1f} MiB/s)")
    sweep.extra.update(mib=mib, rounds=len(sweep.seeds), seconds=seconds, medians_s=medians, ratios=ratios)
    paired = [
        harness.paired_table(rows, "seconds", baseline=BOTO_READ, better="lower", configs=[OUR_READ]),
        harness.paired_table(rows, "seconds", baseline=BOTO_DOWNLOAD, better="lower", configs=[OUR_DOWNLOAD]),
    ]
    notes = [f"{name}: {ratio:.2f}x (ratio of the medians)" for name, ratio in ratios.items()]
    harness.finish(sweep, args, record, rows, paired=paired, notes=notes, title="Resumable S3 reads")


if __name__ == "__main__":
    main()
