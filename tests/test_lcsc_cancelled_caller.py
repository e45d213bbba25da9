"""A caller cancelled with `ray.cancel` (recursive by default: the Ray tasks it started are cancelled with it)
does not cancel the evaluation it asked for: the pool's evaluations are no children of their callers, so the
evaluation finishes, is kept for the next caller, and its evaluator goes back to the pool."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError, TaskCancelledError

from tests.test_lcsc_pool import calls, jobs, pool_spec, start_pool, wait_until


@pytest.mark.timeout(300)
def test_a_caller_cancelled_with_its_children_leaves_its_evaluation_running(ray_local, tmp_path):
    pool = start_pool(pool_spec(tmp_path, "tests.lcsc_search_plugins:gated_sample", log=True))

    @ray_local.remote(num_cpus=0)
    def caller(service, job):
        return ray_local.get(service.evaluate.remote(job))

    try:
        job = jobs(1)[0]
        asked = caller.remote(pool.service, job)
        wait_until(lambda: calls(tmp_path) == 1, what="the evaluation to start on an evaluator")
        ray_local.cancel(asked, recursive=True)
        with pytest.raises((TaskCancelledError, RayTaskError)):
            ray_local.get(asked, timeout=60)
        (tmp_path / "log" / "open").touch()
        # the same job asked again joins (or reads) the one evaluation: one sampler call, a good record
        record = ray_local.get(pool.service.evaluate.remote(job), timeout=120)
        assert record["status"] == "ok" and calls(tmp_path) == 1
        # and no evaluator was lost to the cancel: both take the next jobs, none replaced
        records = pool.score(jobs(3, seed=1))
        assert all(r["status"] == "ok" for r in records)
        assert {r["evaluator"] for r in records} == {0, 1}
        assert pool.state()["replacements"] == 0 and pool.state()["failed"] == 0
    finally:
        pool.close()
