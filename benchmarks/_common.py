"""What every benchmark shares: the machine's description and writing its JSON result atomically."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_PACKAGES = ("torch", "numpy", "scipy", "ray", "nevergrad", "lcsc-checkfree-ray")


def machine_info(**extra) -> dict:
    """Cores, load, torch threads and package versions of this machine, plus `extra` (benchmark-specific)."""
    import torch

    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch_threads_driver": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        **versions,
        **extra,
    }


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` as indented JSON to `path` atomically (a killed benchmark leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
