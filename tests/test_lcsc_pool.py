"""The evaluator pool on a real local Ray: healing, timeouts, deterministic errors, the probe, no leaks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lcsc_ray.checkpoints import load_checkpoint_set
from lcsc_ray.evaluation_records import slowest_timing
from lcsc_ray.fid import reference_stats_for
from lcsc_ray.pool import EvaluatorPool, EvaluatorPoolError, Job, evaluation_timeout
from schemas.search import SearchSpec
from tests.lcsc_plugins import write_run

SAMPLES = 64


def pool_spec(
    tmp_path: Path, sampler: str = "tests.lcsc_plugins:toy_sample", log: bool = False, **evaluators
) -> SearchSpec:
    """Three tiny checkpoints, two evaluators of half a CPU, 64-sample FIDs in one chunk."""
    if not (tmp_path / "ckpts").exists():
        write_run(tmp_path / "ckpts", num=3)
    (tmp_path / "log").mkdir(exist_ok=True)
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {
                "target": sampler,
                "nfe": 2,
                "kwargs": {"log_dir": str(tmp_path / "log")} if log else {},
            },
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": SAMPLES,
            },
            "evaluators": {"num_actors": 2, "batch_size": SAMPLES, "num_cpus": 0.5, **evaluators},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def start_pool(spec: SearchSpec, reference=None) -> EvaluatorPool:
    """A pool over the spec's checkpoints (no evaluation store)."""
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    return EvaluatorPool(spec, checkpoint_set, reference or reference_stats_for(spec))


def jobs(count: int, seed: int = 0) -> list[Job]:
    """`count` distinct coefficient vectors over 3 checkpoints."""
    return [Job.of([0.1 * i, 0.2, 0.8 - 0.1 * i], SAMPLES, seed) for i in range(count)]


def calls(tmp_path: Path) -> int:
    """Sampler calls logged so far."""
    path = tmp_path / "log" / "calls.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie awaiting its parent counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll `condition` until true, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_default_timeout_follows_the_slowest_evaluation():
    """5x the slowest timed evaluation (per sample) scaled by samples, floored at 60 s; the spec's value wins. An
    evaluation slowed by load raises the limit for those after it; a faster one does not lower it."""
    assert evaluation_timeout(500, None, None) == 900.0
    assert evaluation_timeout(500, None, (2.0, 500)) == 60.0
    assert evaluation_timeout(2000, None, (20.0, 500)) == 400.0
    assert evaluation_timeout(2000, 7.5, (20.0, 500)) == 7.5
    slowest = slowest_timing(None, 4.0, 500)
    slowest = slowest_timing(slowest, 30.0, 500)  # the cores got crowded
    assert slowest_timing(slowest, 2.0, 500) == (30.0, 500) == slowest
    assert slowest_timing(slowest, 50.0, 1000) == (30.0, 500)  # 0.05 s per sample: faster per sample
    assert evaluation_timeout(500, None, slowest) == 150.0


@pytest.mark.timeout(480)
def test_dead_evaluator_is_replaced_and_scoring_goes_on(ray_local, tmp_path):
    """An evaluator killed for good is replaced over the same refs; final-style scoring returns the same FIDs."""
    pool = start_pool(pool_spec(tmp_path))
    try:
        before = [r["fid"] for r in pool.score(jobs(4))]
        evaluators = ray_local.get(pool.service.evaluators.remote())
        ray_local.kill(evaluators[0], no_restart=True)
        records = pool.score(jobs(4))
        assert [r["fid"] for r in records] == before and all(r["status"] == "ok" for r in records)
        # the candidate that lost its evaluator was retried on the other one while the pool healed beside it
        assert any(r["attempts"] == 2 and r["evaluator"] == 1 for r in records)
        wait_until(
            lambda: ray_local.get(pool.service.evaluators.remote())[0] != evaluators[0],
            what="the dead evaluator's replacement",
            timeout_s=240,
        )
        state = pool.state()
        assert state["replacements"] == 1 and state["stopped"] is None
        assert [r["fid"] for r in pool.score(jobs(4, seed=1))] == [
            r["fid"] for r in pool.score(jobs(4, seed=1))
        ]
    finally:
        pool.close()


@pytest.mark.timeout(480)
def test_replacement_limit_stops_the_pool_naming_the_cause(ray_local, tmp_path):
    """With `max_replacements: 0`, losing an evaluator for good stops the pool with an error that says so."""
    pool = start_pool(pool_spec(tmp_path, max_replacements=0))
    try:
        for actor in ray_local.get(pool.service.evaluators.remote()):
            ray_local.kill(actor, no_restart=True)
        with pytest.raises(EvaluatorPoolError, match=r"max_replacements` = 0.*evaluator \d died"):
            pool.score(jobs(2))
    finally:
        pool.close()


@pytest.mark.timeout(480)
def test_hung_evaluator_is_killed_replaced_and_its_candidate_retried(ray_local, tmp_path):
    """An evaluation that never returns is cut at `evaluation_timeout_s`: its process dies, a new evaluator
    takes its place and the candidate is scored on the second attempt."""
    spec = pool_spec(tmp_path, "tests.lcsc_search_plugins:hanging_sample", log=True, evaluation_timeout_s=10)
    spec.sampler.kwargs["hang_on_call"] = 2
    pool = start_pool(spec)
    try:
        pool.probe(SAMPLES, 0)  # call 1
        record = pool.score(jobs(1))[0]  # call 2 hangs, call 3 scores it
        hung = int((tmp_path / "log" / "hung").read_text())
        assert record["status"] == "ok" and record["attempts"] == 2 and np.isfinite(record["fid"])
        wait_until(
            lambda: pool.state()["replacements"] == 1, what="the hung evaluator's replacement", timeout_s=240
        )
        wait_until(lambda: not process_alive(hung), what="the hung evaluator process to die")
    finally:
        pool.close()


@pytest.mark.timeout(480)
def test_deterministic_errors_are_not_retried_and_stop_the_pool(ray_local, tmp_path):
    """An evaluation that raises is not run again elsewhere; after `max_failed_evaluations` the pool stops
    with the root cause."""
    spec = pool_spec(tmp_path, "tests.lcsc_search_plugins:failing_sample", log=True, max_failed_evaluations=2)
    pool = start_pool(spec)
    try:
        pool.probe(SAMPLES, 0)
        first = pool.score(jobs(1))[0]
        assert first["status"] == "failed" and "ValueError: broken sampler" in first["reason"]
        assert calls(tmp_path) == 2  # the probe, then one attempt only
        assert pool.score(jobs(1, seed=1))[0]["status"] == "failed"
        with pytest.raises(EvaluatorPoolError, match="2 evaluations failed.*broken sampler"):
            pool.score(jobs(1, seed=2))
        assert calls(tmp_path) == 3
    finally:
        pool.close()


@pytest.mark.timeout(480)
def test_probe_names_a_bad_sampler_signature_and_feature_dimension(ray_local, tmp_path):
    """The probe refuses a sampler that cannot be called as the engine calls it, and features whose dimension
    differs from the reference's."""
    pool = start_pool(pool_spec(tmp_path, "tests.lcsc_search_plugins:two_argument_sample"))
    try:
        with pytest.raises(EvaluatorPoolError, match="probe .*two_argument_sample cannot be called"):
            pool.probe(SAMPLES, 0)
    finally:
        pool.close()
    pool = start_pool(pool_spec(tmp_path), reference=(np.zeros(5), np.eye(5)))
    try:
        with pytest.raises(EvaluatorPoolError, match=r"features of shape \(64, 6\).*dimension 5"):
            pool.probe(SAMPLES, 0)
    finally:
        pool.close()


@pytest.mark.timeout(480)
def test_a_caller_that_dies_mid_evaluation_leaks_no_evaluator(ray_local, tmp_path):
    """Two callers killed while their evaluations run (as a Tune trial process may be) leave both evaluators
    usable: the next two evaluations run side by side on them."""
    spec = pool_spec(tmp_path, "tests.lcsc_search_plugins:counting_sample", log=True)
    pool = start_pool(spec)

    @ray_local.remote(num_cpus=0)
    def caller(service, job):
        return ray_local.get(service.evaluate.remote(job))

    try:
        slow = [Job.of([0.2, 0.3, 0.5], SAMPLES * 40, seed) for seed in (5, 6)]
        callers = [caller.remote(pool.service, job) for job in slow]
        wait_until(lambda: calls(tmp_path) >= 2, what="both slow evaluations to start")
        for ref in callers:
            ray_local.cancel(ref, force=True)
        records = pool.score(jobs(2))
        assert all(r["status"] == "ok" for r in records)
        assert {r["evaluator"] for r in records} <= {0, 1} and pool.state()["replacements"] == 0
    finally:
        pool.close()


def alive_search_actors() -> list[str]:
    """Class names of the search's actors still alive in this Ray (read from the GCS actor table: the state
    API's `list_actors` needs the dashboard, which the test Ray does not start)."""
    import ray

    names = {"PoolService", "Evaluator", "EvaluatorBroker"}
    return [
        a["ActorClassName"]
        for a in ray._private.state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] in names
    ]


@pytest.mark.timeout(480)
def test_closing_the_pool_ends_every_actor(ray_local, tmp_path):
    """After close, neither the service nor any evaluator (replacements included) is alive."""
    pool = start_pool(pool_spec(tmp_path))
    ray_local.kill(ray_local.get(pool.service.evaluators.remote())[1], no_restart=True)
    pool.score(jobs(3))
    wait_until(
        lambda: pool.state()["replacements"] == 1, what="the killed evaluator's replacement", timeout_s=240
    )
    pool.close()
    wait_until(lambda: not alive_search_actors(), what="the pool's actors to end")


@pytest.mark.timeout(400)
def test_a_search_leaves_no_actor_on_success_error_or_ctrl_c(ray_local, tmp_path, monkeypatch):
    """run_search ends every actor it started: after a finished search, after an error (a broken sampler is
    refused by the probe, the output lock is released) and after a KeyboardInterrupt mid-search."""
    from lcsc_ray import search
    from tests.test_lcsc_search import tiny_spec

    search.run_search(tiny_spec(tmp_path / "ok", budget=6))
    wait_until(lambda: not alive_search_actors(), what="the finished search's actors to end")

    broken = tiny_spec(
        tmp_path / "bad", budget=6, sampler={"target": "tests.lcsc_search_plugins:two_argument_sample"}
    )
    with pytest.raises(EvaluatorPoolError, match="probe evaluation of the last checkpoint"):
        search.run_search(broken)
    wait_until(lambda: not alive_search_actors(), what="the failed search's actors to end")
    assert not (tmp_path / "bad" / "out" / "run.lock").exists()

    def interrupted(self, trials):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.SearchRun, "run_rungs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(tiny_spec(tmp_path / "ctrl-c", budget=6))
    wait_until(lambda: not alive_search_actors(), what="the interrupted search's actors to end")
