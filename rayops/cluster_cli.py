"""`lcsc-ray cluster rehearse` / `checkfree-ray cluster rehearse`: a local autoscaling spot cluster to rehearse a
job on before paying for a cloud, optionally with seeded spot events (reclaims and drains)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click

from rayops.cluster_nodes import autoscaler_nodes
from rayops.rehearsal_config import (
    AWS_CONFIG_PATH,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_WORKERS,
    DEFAULT_WORKER_CPUS,
    RehearsalConfigError,
    head_type_name,
)
from rayops.spot_cluster import LocalSpotCluster, SpotClusterError
from rayops.spot_events import PlannedEvent, SpotEventError, SpotEventInjector, plan_spot_events

log = logging.getLogger(__name__)
WATCH_EVERY_S = 5.0


def node_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Lines for the nodes that joined or left between two views `{node_id: node_type}`, sorted by id."""
    joined = [f"+ {after[n]} {n[-8:]} joined" for n in sorted(set(after) - set(before))]
    left = [f"- {before[n]} {n[-8:]} left" for n in sorted(set(before) - set(after))]
    return joined + left


def _node_view(gcs_address: str, head_type: str) -> dict[str, str] | None:
    """`{node_id: node_type}` of the running nodes, the head under the config's head type name."""
    from ray.exceptions import RayError

    try:
        return {
            node.node_id: head_type if node.is_head else node.node_type
            for node in autoscaler_nodes(gcs_address)
        }
    except (OSError, RayError) as exc:  # a busy GCS: look again next time
        log.debug("no node view this time: %s", exc)
        return None


def _watch(
    cluster: LocalSpotCluster, until: float, stop: threading.Event, on_first_worker: Callable[[], None]
) -> None:
    """Print nodes joining and leaving until `until` (monotonic) or `stop`; call `on_first_worker` once, when
    the first worker node is up."""
    seen: dict[str, str] = {}
    head_type, first_worker = head_type_name(cluster.aws_config), True
    while not stop.is_set() and time.monotonic() < until:
        view = _node_view(cluster.address.gcs_address, head_type)
        if view is not None:
            for line in node_changes(seen, view):
                click.echo(f"{time.strftime('%H:%M:%S')} {line}")
            seen = view
            if first_worker and len(view) > 1:
                first_worker = False
                on_first_worker()
        stop.wait(WATCH_EVERY_S)


def _print_welcome(cluster: LocalSpotCluster) -> None:
    address = cluster.address
    click.echo(
        f"local spot cluster up (temp dir {cluster.temp_dir})\n"
        f"  GCS:       {address.gcs_address}\n"
        f"  dashboard: {address.dashboard_url}\n"
        f"submit:  ray job submit --address {address.dashboard_url} --working-dir . -- python -m ...\n"
        f"watch:   ray status --address {address.gcs_address}\n"
        "stop:    Ctrl-C (ends only this cluster's processes)"
    )


@click.group("cluster")
def cluster_group() -> None:
    """Local clusters that behave like the cloud ones in cluster/."""


@cluster_group.command("rehearse")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    default=str(AWS_CONFIG_PATH),
    show_default=True,
    help="Cluster-launcher YAML whose node types (names, labels, resources) to copy.",
)
@click.option(
    "--max-workers",
    type=int,
    default=DEFAULT_MAX_WORKERS,
    show_default=True,
    help="Cap on worker nodes (per type and overall); each is a raylet on this machine.",
)
@click.option(
    "--worker-cpus",
    type=float,
    default=DEFAULT_WORKER_CPUS,
    show_default=True,
    help="Logical CPUs per worker node.",
)
@click.option(
    "--idle-timeout-s",
    type=float,
    default=DEFAULT_IDLE_TIMEOUT_S,
    show_default=True,
    help="Idle workers are removed after this long.",
)
@click.option("--dashboard-port", type=int, default=None, help="Dashboard/Jobs port (default: a free one).")
@click.option(
    "--spot-events",
    type=int,
    default=0,
    show_default=True,
    help="Inject this many spot events (reclaims without notice and drains with a deadline).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the events' moments, kinds, targets."
)
@click.option(
    "--window-s",
    type=float,
    default=300.0,
    show_default=True,
    help="Events fall in [0, window), counted from the first worker node's arrival.",
)
@click.option(
    "--notice-s", type=float, default=30.0, show_default=True, help="A drain's deadline, from its notice."
)
@click.option(
    "--drain-share", type=float, default=0.5, show_default=True, help="Share of events that are drains."
)
@click.option(
    "--timeline",
    "timeline_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the spot events as JSON here when the rehearsal ends.",
)
@click.option(
    "--duration-s", type=float, default=None, help="Stop after this long (default: run until Ctrl-C)."
)
def rehearse(
    config_path: str,
    max_workers: int,
    worker_cpus: float,
    idle_timeout_s: float,
    dashboard_port: int | None,
    spot_events: int,
    seed: int,
    window_s: float,
    notice_s: float,
    drain_share: float,
    timeline_path: str | None,
    duration_s: float | None,
) -> None:
    """Start a local autoscaling cluster shaped like CONFIG's node types; print nodes as they come and go."""
    try:
        plan = plan_spot_events(seed, spot_events, window_s, notice_s, drain_share)
        cluster = LocalSpotCluster(
            config_path,
            worker_cpus=worker_cpus,
            max_workers=max_workers,
            idle_timeout_s=idle_timeout_s,
            dashboard_port=dashboard_port,
        )
    except (ValueError, RehearsalConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        cluster.start()
    except SpotClusterError as exc:
        raise click.ClickException(str(exc)) from None
    stop, injector = threading.Event(), SpotEventInjector(cluster.address.gcs_address, cluster.temp_dir)
    try:
        _print_welcome(cluster)
        injection = threading.Thread(target=_inject, args=(injector, plan, stop), daemon=True)
        _watch(cluster, time.monotonic() + (duration_s or float("inf")), stop, injection.start)
    except KeyboardInterrupt:
        click.echo("Ctrl-C: stopping the local spot cluster")
    finally:
        stop.set()
        injector.cancel()
        cluster.stop()
        click.echo("local spot cluster stopped")
        if timeline_path:
            Path(timeline_path).write_text(json.dumps(injector.timeline(), indent=1))
            click.echo(f"spot events written to {timeline_path}")


def _inject(injector: SpotEventInjector, plan: list[PlannedEvent], stop: threading.Event) -> None:
    """Run the plan (each event is logged as it happens); an error ends the events, not the rehearsal."""
    from ray.exceptions import RayError

    try:
        injector.run(plan, stop)
    except (SpotEventError, OSError, RayError) as exc:  # e.g. the cluster stopping under it
        log.warning("spot events stopped: %s", exc)
