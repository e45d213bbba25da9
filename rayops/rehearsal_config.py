"""The autoscaler config of a local spot-cluster rehearsal, derived from the node types of `cluster/aws-spot.yaml`.

Ray's fake multi-node provider (`ray.autoscaler._private.fake_multi_node`) launches real raylets on this machine
when work is pending and removes idle ones, exactly as the AWS provider launches instances. This module keeps
what the autoscaler decides on from the AWS config (node-type names, their `labels`, their custom resources such
as `spot` / `on_demand`, min/max workers) and scales the rest down to one machine:

- every worker gets `worker_cpus` logical CPUs (default 1) instead of the instance's vCPUs; a GPU instance type
  gets one logical GPU (a scheduling token only: nothing here can run CUDA);
- the head takes no work (`CPU: 0`), as on a cluster whose head holds only the GCS and the job drivers;
- each type's `max_workers` and the cluster's are capped, and the idle timeout is given in seconds.

Pure functions only; `rayops/spot_cluster.py` starts the head that runs this config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

AWS_CONFIG_PATH = Path(__file__).resolve().parents[1] / "cluster" / "aws-spot.yaml"
MARKET_LABEL = (
    "market-type"  # Ray reserves `ray.io/market-type` for itself; custom labels may not use `ray.io/`
)
SPOT, ON_DEMAND = "spot", "on-demand"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the provider's head instance id (also the head's Ray node id)
FAKE_HEAD_TYPE = "ray.head.default"  # the provider tags its head with this type name; the config must use it
FAKE_PROVIDER_CLASS = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
GPU_FAMILIES = ("g", "p")  # EC2 instance families with NVIDIA GPUs (g5, g6, p4d, p5, ...)
DEFAULT_WORKER_CPUS = 1
DEFAULT_MAX_WORKERS = 3  # each worker is a raylet (~0.3 GB, a few % of a core idle): 3 fit on 2 cores
DEFAULT_IDLE_TIMEOUT_S = 20.0


class RehearsalConfigError(ValueError):
    """The AWS config cannot be turned into a local rehearsal (the message names the field and the fix)."""


def load_aws_config(path: str | Path = AWS_CONFIG_PATH) -> dict[str, Any]:
    """The cluster-launcher YAML at `path`, with its `available_node_types` checked to be there."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RehearsalConfigError(f"cannot read the cluster config {path}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise RehearsalConfigError(
            f"{path} has no `available_node_types` mapping; give a Ray cluster-launcher YAML"
        )
    if config.get("head_node_type") not in config["available_node_types"]:
        raise RehearsalConfigError(
            f"{path}: `head_node_type` {config.get('head_node_type')!r} is not one of `available_node_types`"
        )
    return config


def node_market(node_type: dict[str, Any]) -> str:
    """`spot` when the node type's EC2 `InstanceMarketOptions.MarketType` is spot, else `on-demand`."""
    market = node_type.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType", "")
    return SPOT if str(market).lower() == "spot" else ON_DEMAND


def node_labels(name: str, node_type: dict[str, Any]) -> dict[str, str]:
    """The node type's own `labels`, which must agree with its EC2 market (a label that lies would send
    work meant for on-demand capacity to spot nodes)."""
    labels = {str(k): str(v) for k, v in (node_type.get("labels") or {}).items()}
    market = node_market(node_type)
    if labels.setdefault(MARKET_LABEL, market) != market:
        raise RehearsalConfigError(
            f"available_node_types.{name}.labels.{MARKET_LABEL} is {labels[MARKET_LABEL]!r} but the node's "
            f"InstanceMarketOptions say {market!r}; make them agree"
        )
    return labels


def is_gpu_type(node_type: dict[str, Any]) -> bool:
    """Whether the node type's EC2 instance type is in a GPU family (g5.2xlarge, p4d.24xlarge, ...)."""
    instance = str(node_type.get("node_config", {}).get("InstanceType", ""))
    return instance[:1].lower() in GPU_FAMILIES


def scaled_resources(node_type: dict[str, Any], cpus: float, gpu: bool) -> dict[str, float]:
    """The node type's custom resources (`spot`, `on_demand`, ...) with CPU set to `cpus` and, for a GPU
    type, one logical GPU; the instance's own CPU and GPU counts are dropped."""
    resources = {k: v for k, v in (node_type.get("resources") or {}).items() if k not in ("CPU", "GPU")}
    resources["CPU"] = cpus
    if gpu:
        resources["GPU"] = 1
    return resources


def worker_node_types(
    aws_config: dict[str, Any],
    worker_cpus: float = DEFAULT_WORKER_CPUS,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> dict[str, dict[str, Any]]:
    """Every worker type of the AWS config, scaled down: same name, labels and custom resources,
    `worker_cpus` CPUs, `min_workers` kept (capped at `max_workers`), `max_workers` capped."""
    head = aws_config["head_node_type"]
    types = {}
    for name, node_type in aws_config["available_node_types"].items():
        if name == head:
            continue
        cap = min(int(node_type.get("max_workers", max_workers)), max_workers)
        types[name] = {
            "resources": scaled_resources(node_type, worker_cpus, is_gpu_type(node_type)),
            "labels": node_labels(name, node_type),
            "min_workers": min(int(node_type.get("min_workers", 0)), cap),
            "max_workers": cap,
            "node_config": {},
        }
    return types


def head_node_type(aws_config: dict[str, Any]) -> dict[str, Any]:
    """The head, taking no work (CPU 0) but keeping its custom resources (`on_demand`) and labels."""
    name = aws_config["head_node_type"]
    node_type = aws_config["available_node_types"][name]
    return {
        "resources": scaled_resources(node_type, 0, gpu=False),
        "labels": node_labels(name, node_type),
        "node_config": {},
        "min_workers": 0,
        "max_workers": 0,
    }


def check_sizes(worker_cpus: float, max_workers: int, idle_timeout_s: float) -> None:
    """Refuse sizes no cluster can have, naming each bad one."""
    bad = [
        f"{name} must be {rule}, got {value}"
        for name, value, rule, ok in [
            ("worker_cpus", worker_cpus, "> 0", worker_cpus > 0),
            ("max_workers", max_workers, ">= 1", max_workers >= 1),
            ("idle_timeout_s", idle_timeout_s, "> 0", idle_timeout_s > 0),
        ]
        if not ok
    ]
    if bad:
        raise RehearsalConfigError("; ".join(bad))


def rehearsal_config(
    aws_config: dict[str, Any],
    gcs_address: str,
    *,
    worker_cpus: float = DEFAULT_WORKER_CPUS,
    max_workers: int = DEFAULT_MAX_WORKERS,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> dict[str, Any]:
    """The whole autoscaler config for Ray's fake multi-node provider (autoscaler v2), for a head whose
    GCS listens on `gcs_address`; the head's node type is renamed to the provider's fixed head type."""
    check_sizes(worker_cpus, max_workers, idle_timeout_s)
    node_types = worker_node_types(aws_config, worker_cpus, max_workers)
    node_types[FAKE_HEAD_TYPE] = head_node_type(aws_config)
    return {
        "cluster_name": f"{aws_config.get('cluster_name', 'cluster')}-rehearsal",
        "max_workers": min(int(aws_config.get("max_workers", max_workers)), max_workers),
        "upscaling_speed": float(aws_config.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            # Ray's fake provider loaded as an external one: the `fake_multinode` type makes autoscaler v2 read
            # defaults from `fake_multi_node/example.yaml`, which the Ray wheel does not ship.
            "type": "external",
            "module": FAKE_PROVIDER_CLASS,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,  # v2 asks for n nodes at once
            "gcs_address": gcs_address,  # without it launched nodes dial port 6379 and never join
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": node_types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def head_type_name(aws_config: dict[str, Any]) -> str:
    """The AWS config's head node-type name (the rehearsal's head reports it as its `ray.io/node-group`)."""
    return str(aws_config["head_node_type"])
