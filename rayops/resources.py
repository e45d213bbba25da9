"""Can the cluster ever place a request? Asked before actors or placement groups are created.

On a fixed-size cluster (a local Ray, or nodes started by hand: nothing adds nodes), a request larger than the
cluster is refused at once, naming what is asked and what is there; Ray itself would wait forever while its
autoscaler repeats "No available node types can fulfill resource requests". On an autoscaling cluster the
same request may be met by new nodes: it is allowed, with a warning that says what is awaited.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import ray

from rayops import settings
from schemas.errors import InfeasibleResourcesError

log = logging.getLogger(__name__)
AUTOSCALING_ENV = "LCSC_CLUSTER_AUTOSCALES"  # "1" or "0" overrides the detection below
_STATUS_KEY = b"__autoscaling_status"  # written by Ray's autoscaler monitor into the GCS key-value store


def cluster_autoscales() -> bool:
    """True when something may add nodes: `$LCSC_CLUSTER_AUTOSCALES` decides when set; else an autoscaler
    monitor runs with an autoscaling config, or runs where this process cannot see it (KubeRay's sidecar, a
    remote head). Ray's own monitor without a config (a local or hand-made cluster) never adds nodes."""
    override = settings.env_str(AUTOSCALING_ENV)
    if override is not None:
        return override.strip() == "1"
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_STATUS_KEY)
    if raw is None:
        # autoscaler v2 writes no status there: it marks itself in the GCS and runs as a monitor process
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return _v2_monitor_autoscales()
        return False  # no autoscaler has reported: nothing will add nodes
    try:
        pid = int(json.loads(raw).get("monitor_pid"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ValueError, TypeError, AttributeError, OSError):
        return True  # an autoscaler runs elsewhere: it may add nodes
    if b"monitor.py" not in cmdline:
        return True  # that pid is not the monitor here: it runs on another host
    return b"--autoscaling-config" in cmdline


def _v2_monitor_autoscales() -> bool:
    """Autoscaler v2: True unless this cluster's monitor runs here without an autoscaling config (a local
    `ray start` head); a monitor this process cannot see (KubeRay's sidecar, a remote head) may add nodes."""
    gcs_address = ray.get_runtime_context().gcs_address
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # it ended while we looked
            continue
        if b"monitor.py" in cmdline and f"--gcs-address={gcs_address}".encode() in cmdline:
            return b"--autoscaling-config" in cmdline
    return True


def _alive_nodes() -> list[dict[str, float]]:
    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def placement_problem(
    bundles: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]], strategy: str = "PACK"
) -> str | None:
    """Why `bundles` (each placed whole on one node) can never fit `nodes` (their total resources), or None.
    Pure: `strategy` is a placement-group strategy (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)."""
    asked: Counter = Counter()
    for bundle in bundles:
        asked.update({k: v for k, v in bundle.items() if v})
    present: Counter = Counter()
    for node in nodes:
        present.update(node)
    short = {k: v for k, v in asked.items() if v > present.get(k, 0) + 1e-9}
    if short:
        return "; ".join(f"{v:g} {k} in all, the cluster has {present.get(k, 0):g}" for k, v in short.items())
    for bundle in bundles:
        if not any(all(node.get(k, 0) + 1e-9 >= v for k, v in bundle.items() if v) for node in nodes):
            biggest = max((node.get("CPU", 0) for node in nodes), default=0)
            return f"one of them needs {dict(bundle)} on a single node, and no node has that (largest: {biggest:g} CPU)"
    if strategy == "STRICT_PACK" and not any(
        all(node.get(k, 0) + 1e-9 >= v for k, v in asked.items()) for node in nodes
    ):
        return f"STRICT_PACK needs {dict(asked)} on one node, and no node has that"
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        return f"STRICT_SPREAD needs {len(bundles)} nodes, the cluster has {len(nodes)}"
    return None


def check_placeable(
    bundles: Sequence[Mapping[str, float]], what: str, fields: str, strategy: str = "PACK"
) -> None:
    """Refuse at once (`InfeasibleResourcesError`) a request a fixed-size cluster can never place; on an
    autoscaling cluster log what is awaited instead. `what` names the request, `fields` the spec fields that
    size it. Ray must be initialised."""
    nodes = _alive_nodes()
    problem = placement_problem(bundles, nodes, strategy)
    if problem is None:
        return
    total = {
        k: v
        for k, v in ray.cluster_resources().items()
        if not k.startswith("node:") and k not in ("memory", "object_store_memory")
    }
    message = (
        f"{what} ({len(bundles)} x {dict(bundles[0]) if bundles else {}}) cannot be placed: {problem}; "
        f"cluster resources: {total} on {len(nodes)} node(s)"
    )
    if cluster_autoscales():
        log.warning("%s; waiting for the autoscaler to add nodes that fit", message)
        return
    raise InfeasibleResourcesError(
        f"{message}; this cluster does not grow: lower {fields}, or add nodes", source=fields
    )
