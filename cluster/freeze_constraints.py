"""Write cluster/constraints.txt: exact pins of every runtime dependency, as installed in this environment.

The image installs the project with `pip install -c cluster/constraints.txt .`, so every node runs the same
builds as the environment the tests passed in. Run it from the project's venv after changing dependencies:

    .venv/bin/python cluster/freeze_constraints.py

Only the runtime closure is pinned (pyproject's `dependencies`, with their extras, followed through each
package's own requirements for this platform); test tools stay out. Local version labels (`+cpu`) are dropped:
the CPU and CUDA builds of torch share the pin and come from different indexes.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "cluster" / "constraints.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of `requirements` and everything they require here."""
    pinned: dict[str, str] = {}
    pending = [(Requirement(r), ()) for r in requirements]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while pending:
        requirement, parent_extras = pending.pop()
        environments = [{"extra": e} for e in parent_extras] or [{"extra": ""}]
        if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
            continue
        name, extras = _canonical(requirement.name), tuple(sorted(requirement.extras))
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        distribution = metadata.distribution(name)
        pinned[name] = distribution.version.split("+")[0]
        pending += [(Requirement(r), extras) for r in distribution.requires or []]
    return pinned


def render(pins: dict[str, str]) -> str:
    """The constraints file's text."""
    header = (
        "# Exact pins of the runtime dependencies, frozen from the environment the tests ran in by\n"
        "# cluster/freeze_constraints.py. The Dockerfile installs with `-c cluster/constraints.txt`.\n"
        f"# Python {sys.version_info.major}.{sys.version_info.minor}, {sys.platform}.\n"
    )
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> None:
    """Freeze the runtime closure of pyproject's dependencies into cluster/constraints.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = runtime_closure(project["dependencies"])
    OUT.write_text(render(pins))
    print(f"wrote {len(pins)} pins to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
