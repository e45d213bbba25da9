"""What every benchmark shares: paths, the machine's description, a local Ray, and writing results atomically
(JSON, and Markdown notes generated from the measured values)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path

from rayops.cpu_steal import read_cpu_times, steal_fraction

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = ROOT / "outputs" / "bench" / "quick"  # --quick runs write here, never over a full result

RAYLET_START_WAIT = "RAY_raylet_start_wait_time_s"  # Ray's config, read from the environment at start
_PACKAGES = ("torch", "numpy", "scipy", "ray", "nevergrad", "lcsc-checkfree-ray")


_CPU_AT_IMPORT = read_cpu_times()  # a benchmark imports this first: its share of CPU the host took since


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
        "cpu_steal_fraction_since_import": steal_fraction(_CPU_AT_IMPORT, read_cpu_times()),
        "torch_threads_driver": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        **versions,
        **extra,
    }


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when benchmarks/ or the packages have uncommitted edits
    ('unknown' outside a git checkout): the code a result was measured with."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--",
                "benchmarks",
                "lcsc_ray",
                "checkfree_ray",
                "rayops",
                "schemas",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` as indented JSON to `path` atomically (a killed benchmark leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[None]:
    """A local Ray with `num_cpus` CPUs for a benchmark, through `rayops.session` (the CLIs' settings: loopback,
    no auth, no usage stats), stopped after. Always a fresh local instance: $RAY_ADDRESS is ignored while it
    starts, so a benchmark never measures (or counts the actors of) someone else's cluster. Every benchmark uses
    this instead of its own `ray.init`."""
    from rayops.session import ray_session
    from schemas.common import RaySpec

    # a niced benchmark on a loaded machine can take longer than Ray's default wait for its raylet to register
    os.environ.setdefault(RAYLET_START_WAIT, "120")
    address = os.environ.pop("RAY_ADDRESS", None)
    try:
        with ray_session(RaySpec(num_cpus=num_cpus)):
            if address is not None:
                os.environ["RAY_ADDRESS"] = address
                address = None
            yield
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address


def write_markdown(path: Path, title: str, sections: list[tuple[str, str | list[str]]]) -> Path:
    """Write a results note atomically: `# title`, then per section `## heading` and its text (a list of
    strings becomes bullet points). Notes are generated from measured values, never fixed prose."""
    lines = [f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", ""]
        lines += [f"- {item}" for item in body] if isinstance(body, list) else [body.rstrip()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured Markdown table of `rows` under `header` (cells as str)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
