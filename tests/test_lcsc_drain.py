"""LCSC evaluators on a draining node are replaced before the node goes; their candidate in flight is retried."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_lcsc_pool import SAMPLES, jobs, pool_spec, process_alive, start_pool, wait_until

pytestmark = pytest.mark.timeout(240)
DOOMED = "draining-node"


def test_evaluator_on_draining_node_is_replaced_and_its_candidate_retried(ray_local, tmp_path):
    """The evaluator stuck on a candidate sits on a draining node: a new evaluator takes its slot, the old process
    ends, the candidate is scored again (well before its timeout, on its first attempt), and it is no failure."""
    spec = pool_spec(tmp_path, "tests.lcsc_search_plugins:hanging_sample", log=True, evaluation_timeout_s=200)
    spec.sampler.kwargs["hang_on_call"] = 2
    pool = start_pool(spec)
    try:
        pool.probe(SAMPLES, 0)  # call 1
        before = ray_local.get(pool.service.evaluators.remote())
        pending = pool.service.evaluate.remote(jobs(1)[0])  # call 2 hangs on one evaluator
        wait_until(lambda: (tmp_path / "log" / "hung").exists(), what="the candidate to start")
        hung = int((tmp_path / "log" / "hung").read_text())
        index = pool.state()["pids"].index(hung)
        nodes = ["alive"] * len(before)
        nodes[index] = DOOMED
        replaced = ray_local.get(pool.service.replace_draining.remote({DOOMED: 0}, nodes), timeout=120)
        record = ray_local.get(pending, timeout=120)
        assert replaced == [index]
        # scored again on the new evaluator; a planned replacement costs the candidate none of its attempts
        assert record["status"] == "ok" and record["attempts"] == 1 and np.isfinite(record["fid"])
        state = pool.state()
        assert (state["drained"], state["replacements"], state["stopped"]) == (1, 0, None)
        after = ray_local.get(pool.service.evaluators.remote())
        assert after[index] != before[index] and after[1 - index] == before[1 - index]
        wait_until(lambda: not process_alive(hung), what="the drained evaluator's process to end")
        assert [r["status"] for r in pool.score(jobs(3))] == ["ok"] * 3  # the pool goes on with the new one
    finally:
        pool.close()


def test_no_draining_node_replaces_nothing(ray_local, tmp_path):
    """Drains elsewhere (nodes the evaluators are not on) leave every evaluator in place."""
    pool = start_pool(pool_spec(tmp_path))
    try:
        before = ray_local.get(pool.service.evaluators.remote())
        assert ray_local.get(pool.service.replace_draining.remote({DOOMED: 0}), timeout=60) == []
        assert ray_local.get(pool.service.evaluators.remote()) == before and pool.state()["drained"] == 0
    finally:
        pool.close()


def test_the_watch_loop_hands_each_look_to_the_replacer_until_the_pool_stops(monkeypatch):
    """`watch_drains` asks the watcher every poll interval, passes what it saw to `replace_draining`, and ends
    once the pool service has stopped (no Ray needed: the service and the node source are stand-ins)."""
    import asyncio
    from types import SimpleNamespace

    from lcsc_ray import draining
    from rayops.draining import DrainWatcher

    looks = iter([{}, {DOOMED: 123}, {DOOMED: 123}])
    watcher = DrainWatcher(source=lambda: next(looks), poll_every_s=0.01)
    service = SimpleNamespace(stopped=False)
    seen = []

    async def replacer(svc, nodes):
        seen.append(dict(nodes))
        svc.stopped = len(seen) == 3

    monkeypatch.setattr(draining, "replace_draining", replacer)
    asyncio.run(asyncio.wait_for(draining.watch_drains(service, watcher), timeout=10))
    assert seen == [{}, {DOOMED: 123}, {DOOMED: 123}] and watcher.polls == 3
