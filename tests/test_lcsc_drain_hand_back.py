"""A drained evaluator whose replacement cannot be up before the deadline hands its candidate back at once: the
candidate runs again elsewhere (no attempt spent, nothing counted), the pool shrinks, and the replacement joins
once it is constructed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.test_lcsc_pool import SAMPLES, jobs, pool_spec, process_alive, start_pool, wait_until

DOOMED = "draining-node"


@pytest.mark.timeout(300)
def test_a_drain_too_close_to_its_deadline_hands_the_candidate_back(ray_local, tmp_path):
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
        deadline_ms = int(time.time() * 1000) + 2000  # inside the hand-back margin: no time for a replacement
        replaced = ray_local.get(
            pool.service.replace_draining.remote({DOOMED: deadline_ms}, nodes), timeout=120
        )
        assert replaced == [index]
        assert pool.state()["live"] == len(before) - 1  # the slot left the pool until its new evaluator is up
        record = ray_local.get(pending, timeout=120)
        # scored again on the other evaluator; a hand-back costs the candidate none of its attempts
        assert record["status"] == "ok" and record["attempts"] == 1 and np.isfinite(record["fid"])
        assert record["evaluator"] != index
        wait_until(lambda: not process_alive(hung), what="the drained evaluator's process to end")
        wait_until(lambda: pool.state()["live"] == len(before), timeout_s=180, what="the replacement to join")
        state = pool.state()
        assert (state["drained"], state["replacements"], state["stopped"]) == (1, 0, None)
        assert ray_local.get(pool.service.evaluators.remote())[index] != before[index]
        assert [r["status"] for r in pool.score(jobs(3))] == ["ok"] * 3
    finally:
        pool.close()
