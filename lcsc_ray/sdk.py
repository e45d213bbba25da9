"""The LCSC Python SDK: run a search in this process, or submit it as a Ray job."""

from __future__ import annotations

from pathlib import Path

from rayops.jobs import JobHandle, submit_spec
from schemas.loader import load_spec
from schemas.search import SearchResult, SearchSpec


def _as_spec(spec: SearchSpec | str | Path) -> SearchSpec:
    return spec if isinstance(spec, SearchSpec) else load_spec(spec, SearchSpec)


def _flags(restart: bool, force: bool) -> list[str]:
    return [flag for flag, on in (("--restart", restart), ("--force", force)) if on]


def run_search(spec: SearchSpec | str | Path, restart: bool = False, force: bool = False) -> SearchResult:
    """Run (or resume) the search in this driver; returns its result (also written to `output.uri`).

    A finished search's stored result is returned without running it again, unless `force`; `restart`
    clears the stored state and starts over (needed when the inputs changed since the search started)."""
    from lcsc_ray.search import run_search as _run

    return _run(_as_spec(spec), restart=restart, force=force)


def submit_search(
    spec: SearchSpec | str | Path, address: str | None = None, restart: bool = False, force: bool = False
) -> JobHandle[SearchResult]:
    """Submit the search through Ray's Jobs API (a local head when no address); returns a `JobHandle`
    with `status()`, `wait()`, `result()`, `logs()`, `stop()` and `close()`. `restart` and `force` as in
    `run_search`."""
    return submit_spec(
        _as_spec(spec), "lcsc_ray", "search", SearchResult, address=address, extra_args=_flags(restart, force)
    )
