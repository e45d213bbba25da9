"""A local Ray head in its own process, for submitting jobs when no cluster address is given.

`python -m rayops.local_head --num-cpus 2` starts Ray (loopback only, dashboard and job server on a free
port), prints `DASHBOARD http://127.0.0.1:PORT`, and keeps the head up until it gets SIGTERM or its
stdin closes; then it shuts down the Ray it started, and nothing else.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from rayops.s3_server import free_port
from rayops.session import apply_local_ray_env


def main(argv: list[str] | None = None) -> None:
    """Start the head and block until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--dashboard-port", type=int, default=0)
    args = parser.parse_args(argv)
    apply_local_ray_env()
    import ray

    context = ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=args.dashboard_port or free_port(),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(f"DASHBOARD http://{context.dashboard_url}", flush=True)
    stop.wait()
    ray.shutdown()


if __name__ == "__main__":
    main()
