"""Connect to Ray (the spec's address, $RAY_ADDRESS) or start a local instance; shut down only what we started."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from rayops import settings
from schemas.common import RaySpec

log = logging.getLogger(__name__)
LOCAL_START_ATTEMPTS = 3  # a local Ray start on crowded cores can time out while its raylet registers
RAYLET_START_WAIT = "RAY_raylet_start_wait_time_s"  # Ray's wait for the raylet, read from the environment
LOCAL_RAYLET_START_WAIT_S = "120"  # Ray's default (60 s) was too short at load 10 on 2 cores
RAY_COLOR_PREFIX = "RAY_COLOR_PREFIX"  # Ray 2.60: "0" prints worker-log prefixes without colour codes


@dataclass(frozen=True)
class RaySession:
    """What `ray_session` connected to."""

    address: str
    started_here: bool
    local: bool


def apply_log_colours(stdout_is_tty: bool | None = None, stderr_is_tty: bool | None = None) -> None:
    """Turn off the ANSI colours Ray puts around forwarded worker-log prefixes (`\x1b[36m(Actor pid=..)`)
    when stdout or stderr is a file or pipe; Ray reads `RAY_COLOR_PREFIX` each time it prints, so this holds
    for a Ray already running. A value the user set is kept."""
    stdout_is_tty = _isatty(sys.stdout) if stdout_is_tty is None else stdout_is_tty
    stderr_is_tty = _isatty(sys.stderr) if stderr_is_tty is None else stderr_is_tty
    if not (stdout_is_tty and stderr_is_tty):
        os.environ.setdefault(RAY_COLOR_PREFIX, "0")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def apply_local_ray_env() -> None:
    """Set the loopback, auth and usage settings a local Ray needs (without overriding the user's), and plain
    worker-log prefixes when the output is not a terminal."""
    for name, value in settings.LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
    apply_log_colours()


def resolve_address(spec: RaySpec | None) -> str | None:
    """The spec's address wins, then $RAY_ADDRESS; None means start a local instance."""
    if spec is not None and spec.address:
        return spec.address
    return settings.env_str(settings.RAY_ADDRESS)


def start_local_ray(attempts: int = LOCAL_START_ATTEMPTS, **init_kwargs):
    """`ray.init(address="local", ...)`, started again (up to `attempts` times in all) when the node timed out
    during start-up, as it can on crowded cores; any other error is raised at once. Returns Ray's context."""
    os.environ.setdefault(RAYLET_START_WAIT, LOCAL_RAYLET_START_WAIT_S)
    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address="local", **init_kwargs)
        except Exception as exc:  # Ray's node start raises a bare Exception when it times out
            if "timed out" not in str(exc) or attempt == attempts:
                raise
            log.warning(
                "the local Ray did not start in time (attempt %d of %d: %s); starting it again",
                attempt,
                attempts,
                " ".join(str(exc).split())[:200],
            )
            ray.shutdown()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def ray_session(spec: RaySpec | None = None, runtime_env: dict | None = None) -> Iterator[RaySession]:
    """Use the Ray already initialised in this process, else connect or start one, and clean up after."""
    spec = spec or RaySpec()
    apply_log_colours()
    if ray.is_initialized():
        context = ray.get_runtime_context()
        yield RaySession(address=context.gcs_address, started_here=False, local=False)
        return
    address = resolve_address(spec)
    apply_local_ray_env()
    kwargs: dict = {"namespace": spec.namespace, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address:
        log.info("connecting to Ray at %s", address)
        context = ray.init(address=address, **kwargs)
        local = False
    else:
        context = start_local_ray(
            num_cpus=spec.num_cpus,
            object_store_memory=spec.object_store_memory,
            include_dashboard=False,
            **kwargs,
        )
        local = True
    try:
        yield RaySession(address=context.address_info.get("gcs_address", ""), started_here=True, local=local)
    finally:
        ray.shutdown()  # disconnects from a remote cluster; stops a local one we started
