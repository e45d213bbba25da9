"""A heal that raises something unexpected: its slot comes back (the heal is retried) or the pool stops naming it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lcsc_ray.pool import EvaluatorPoolError
from tests.lcsc_plugins import build_tiny
from tests.test_lcsc_pool import jobs, pool_spec, start_pool, wait_until

pytestmark = pytest.mark.timeout(300)
INJECTED = "injected: memory facts unreadable in this container"


def build_tiny_breaking_info(log_dir: str, channels: int = 4, seed: int = 0):
    """build_tiny; while `log_dir/break_info` exists, the evaluator process this builds in answers `info()` with
    a RuntimeError (psutil's memory facts fail, as they can under a locked-down container). With `once` written in
    that file, only the first evaluator built after it breaks (the file is removed)."""
    import psutil  # Ray's bundled copy (ray/thirdparty_files), on the path once ray is imported

    trigger = Path(log_dir) / "break_info"
    if trigger.exists():
        if trigger.read_text() == "once":
            trigger.unlink()
        with open(Path(log_dir) / "broken", "a") as handle:
            handle.write(f"{os.getpid()}\n")

        def broken(self):
            raise RuntimeError(INJECTED)

        psutil.Process.memory_full_info = broken
    return build_tiny(channels, seed)


def breaking_spec(tmp_path: Path, **evaluators):
    """pool_spec whose evaluators are built by build_tiny_breaking_info (logging into tmp_path/log)."""
    spec = pool_spec(tmp_path, **evaluators)
    spec.model.target = "tests.test_lcsc_corner_heal:build_tiny_breaking_info"
    spec.model.kwargs = {"log_dir": str(tmp_path / "log")}
    return spec


def broken_count(tmp_path: Path) -> int:
    """Evaluator processes built broken so far."""
    path = tmp_path / "log" / "broken"
    return len(path.read_text().split()) if path.exists() else 0


def test_a_heal_that_raises_once_is_retried_and_its_slot_serves_again(ray_local, tmp_path):
    """Evaluator 0 dies; Ray's restart of it answers `info()` with an unexpected error: the heal is retried (a new
    actor), the slot serves candidates again, and the pool has not stopped."""
    pool = start_pool(breaking_spec(tmp_path))
    try:
        before = [r["fid"] for r in pool.score(jobs(4))]
        (tmp_path / "log" / "break_info").write_text("once")
        ray_local.kill(ray_local.get(pool.service.evaluators.remote(), timeout=60)[0], no_restart=False)
        assert [r["fid"] for r in pool.score(jobs(4))] == before
        wait_until(lambda: broken_count(tmp_path) == 1, timeout_s=120, what="the broken evaluator")
        used, seed, deadline = set(), 1, time.monotonic() + 180
        while 0 not in used and time.monotonic() < deadline:  # slot 0 takes candidates again once healed
            used |= {r["evaluator"] for r in pool.score(jobs(4, seed=seed))}
            seed += 1
            time.sleep(0.2)
        state = pool.state()
        assert used == {0, 1} and state["stopped"] is None and state["replacements"] >= 1
    finally:
        pool.close()


def test_a_heal_that_keeps_raising_stops_the_pool_naming_the_error(ray_local, tmp_path):
    """Every new evaluator answers `info()` with an unexpected error: the heal is retried up to the cap, then the
    pool stops with that error named (instead of neither healing nor stopping)."""
    pool = start_pool(breaking_spec(tmp_path, max_replacements=2))
    try:
        (tmp_path / "log" / "break_info").write_text("always")
        ray_local.kill(ray_local.get(pool.service.evaluators.remote(), timeout=60)[0], no_restart=False)
        pool.score(jobs(2))  # the candidate on evaluator 0 is retried on evaluator 1
        wait_until(lambda: pool.state()["stopped"] is not None, timeout_s=200, what="the pool to stop")
        assert INJECTED in pool.state()["stopped"] and "evaluator 0" in pool.state()["stopped"]
        with pytest.raises(EvaluatorPoolError, match=INJECTED):
            pool.score(jobs(2, seed=3))
    finally:
        pool.close()


def test_the_drain_watch_outlives_an_unexpected_error_in_a_replacement(monkeypatch, caplog):
    """A look whose replacement raises is logged by name and the watch goes on to the next look (no Ray: the
    service and the node source are stand-ins)."""
    import asyncio
    from types import SimpleNamespace

    from lcsc_ray import draining
    from rayops.draining import DrainWatcher

    watcher = DrainWatcher(source=lambda: {"doomed-node": 0}, poll_every_s=0.01)
    service = SimpleNamespace(stopped=False)
    looks = []

    async def replacer(svc, nodes):
        looks.append(dict(nodes))
        if len(looks) == 1:
            raise KeyError("slot 7")
        svc.stopped = True

    monkeypatch.setattr(draining, "replace_draining", replacer)
    asyncio.run(asyncio.wait_for(draining.watch_drains(service, watcher), timeout=10))
    assert len(looks) == 2 and "KeyError: 'slot 7'" in caplog.text
