"""Turn an AWS spot interruption notice into a Ray drain of this node (one watcher per worker node).

AWS posts the notice two minutes before it takes a spot instance back, at the instance metadata path
`spot/instance-action` (IMDSv2: a session token from a PUT first, then the GET with that token; 404 means no
notice). On a notice this runs, once,

    ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "..." \
        --deadline-remaining-seconds <seconds until the notice's time>

so Ray marks the node as draining with that deadline: the scheduler stops placing work there, and the engines
(which watch draining nodes) move what they can off it before it goes. Started in the background by the
worker's setup commands in cluster/aws-spot.yaml; stdlib only, so it runs in the image as is.

    python cluster/spot_drain.py [--poll-s 5] [--address HEAD:6379] [--node-id HEX] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class Notice:
    """A spot interruption notice: what AWS will do to the instance, and when (UTC)."""

    action: str
    time: datetime


def parse_notice(body: str) -> Notice:
    """The notice in the body of `spot/instance-action`, e.g. {"action": "terminate", "time": "...Z"}."""
    try:
        data = json.loads(body)
        action, when = data["action"], data["time"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a spot instance-action notice ({exc}): {body[:200]!r}") from None
    if action not in ACTIONS:
        raise ValueError(f"unknown spot instance action {action!r}; expected one of {ACTIONS}")
    moment = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return Notice(action, moment)


def remaining_seconds(notice: Notice, now: datetime) -> int:
    """Whole seconds from `now` to the notice's time, never negative (a late notice drains at once)."""
    return max(0, int((notice.time - now).total_seconds()))


def drain_command(
    notice: Notice,
    now: datetime,
    ray_cli: str = "ray",
    address: str | None = None,
    node_id: str | None = None,
) -> list[str]:
    """The `ray drain-node` command for this notice (the node defaults to the one this runs on)."""
    seconds = remaining_seconds(notice, now)
    command = [
        ray_cli,
        "drain-node",
        "--reason",
        DRAIN_REASON,
        "--reason-message",
        f"spot {notice.action} at {notice.time:%Y-%m-%dT%H:%M:%SZ}",
        "--deadline-remaining-seconds",
        str(seconds),
    ]
    if address:
        command += ["--address", address]
    if node_id:
        command += ["--node-id", node_id]
    return command


def fetch_notice(imds_url: str = IMDS_URL, timeout_s: float = 2.0) -> Notice | None:
    """The current notice from IMDSv2, or None when there is none (404)."""
    token_request = urllib.request.Request(
        imds_url + TOKEN_PATH,
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
    )
    with urllib.request.urlopen(token_request, timeout=timeout_s) as response:
        token = response.read().decode()
    notice_request = urllib.request.Request(
        imds_url + NOTICE_PATH, headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(notice_request, timeout=timeout_s) as response:
            return parse_notice(response.read().decode())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def watch(args: argparse.Namespace) -> int:
    """Poll until a notice arrives, run (or with --dry-run print) the drain, and exit; a drain Ray refuses
    (e.g. Ray not started yet) is tried again at the next poll."""
    while True:
        try:
            notice = fetch_notice(args.imds_url)
        except (OSError, ValueError) as exc:  # metadata service briefly unreachable, or a malformed notice
            print(f"spot_drain: cannot read the spot notice: {exc}", file=sys.stderr, flush=True)
            notice = None
        if notice is not None:
            command = drain_command(
                notice, datetime.now(timezone.utc), args.ray_cli, args.address, args.node_id
            )
            print("spot_drain: " + " ".join(command), flush=True)
            if args.dry_run:
                return 0
            result = subprocess.run(command, timeout=60, check=False)
            if result.returncode == 0 or args.once:
                return result.returncode
        elif args.once:
            return 0
        time.sleep(args.poll_s)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls (AWS advises 5)")
    parser.add_argument("--address", help="the Ray GCS address (default: the cluster this node runs)")
    parser.add_argument("--node-id", help="the Ray node to drain (default: this node)")
    parser.add_argument("--ray-cli", default="ray", help="the ray executable")
    parser.add_argument("--imds-url", default=IMDS_URL, help="the instance metadata service")
    parser.add_argument("--once", action="store_true", help="poll once and exit")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the drain command instead of running it"
    )
    return watch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
