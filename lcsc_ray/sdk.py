"""The LCSC Python SDK: run a search in this process, or submit it as a Ray job."""

from __future__ import annotations

from pathlib import Path

from rayops.jobs import JobHandle, submit_spec
from schemas.loader import load_spec
from schemas.search import SearchResult, SearchSpec


def _as_spec(spec: SearchSpec | str | Path) -> SearchSpec:
    return spec if isinstance(spec, SearchSpec) else load_spec(spec, SearchSpec)


def run_search(spec: SearchSpec | str | Path) -> SearchResult:
    """Run (or resume) the search in this driver; returns its result (also written to `output.uri`)."""
    from lcsc_ray.search import run_search as _run

    return _run(_as_spec(spec))


def submit_search(spec: SearchSpec | str | Path, address: str | None = None) -> JobHandle[SearchResult]:
    """Submit the search through Ray's Jobs API (a local head when no address); returns a `JobHandle`
    with `status()`, `wait()`, `result()`, `logs()`, `stop()` and `close()`."""
    return submit_spec(_as_spec(spec), "lcsc_ray", "search", SearchResult, address=address)
