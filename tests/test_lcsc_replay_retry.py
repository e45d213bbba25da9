"""A proposal whose Tune trial errored (its process died) is proposed again once, and told when that ends."""

import nevergrad as ng
import numpy as np
from ray.tune.search import Searcher

from lcsc_ray.tuning import ReplaySearcher


def _searcher(tmp_path, budget: int = 3) -> ReplaySearcher:
    optimizer = ng.optimizers.CMA(parametrization=ng.p.Array(init=np.zeros(2)), budget=budget, num_workers=1)
    optimizer.parametrization.random_state = np.random.RandomState(0)
    return ReplaySearcher(optimizer, ["a", "b"], num_workers=1, record_uri=str(tmp_path / "proposals"))


def test_an_errored_trial_is_proposed_again_and_its_rerun_result_recorded(tmp_path):
    """The errored proposal goes to the next trial (same point), its result is the one recorded and told."""
    searcher = _searcher(tmp_path)
    first = searcher.suggest("t1")
    searcher.on_trial_complete("t1", error=True)
    assert searcher.suggest("t2") == first  # the same proposal, in a new trial
    assert searcher.entries[0]["done"] is False and searcher.told == 0
    searcher.on_trial_complete("t2", result={"fid": 1.5})
    assert searcher.entries[0]["value"] == 1.5 and searcher.entries[0]["attempts"] == 2 and searcher.told == 1


def test_a_second_failure_is_final_and_the_phase_finishes_only_when_all_are_done(tmp_path):
    """After two failed attempts the proposal is recorded failed; FINISHED waits for every proposal."""
    searcher = _searcher(tmp_path, budget=1)
    searcher.suggest("t1")
    assert searcher.suggest("t9") is None  # one worker busy
    searcher.on_trial_complete("t1", error=True)
    searcher.suggest("t2")
    searcher.on_trial_complete("t2", error=True)
    assert searcher.entries[0]["done"] is True and searcher.entries[0]["value"] is None
    assert searcher.suggest("t3") == Searcher.FINISHED


def test_a_resume_attempts_again_a_proposal_recorded_failed_once(tmp_path):
    """A proposal recorded failed after one attempt is re-issued on resume and not told until it ends."""
    searcher = _searcher(tmp_path)
    first = searcher.suggest("t1")
    searcher.entries[0].update(done=True, value=None)  # as recorded by a run that stopped after the failure
    searcher.record.write(searcher.entries[0])
    resumed = _searcher(tmp_path)
    assert resumed.told == 0 and resumed.suggest("t2") == first
    resumed.on_trial_complete("t2", result={"fid": 2.0})
    assert resumed.entries[0]["value"] == 2.0 and resumed.told == 1


def test_a_resumed_second_attempt_that_fails_is_final(tmp_path):
    """The attempt after a resume is the second: if it fails too, the proposal is recorded failed for good."""
    searcher = _searcher(tmp_path)
    searcher.suggest("t1")
    searcher.entries[0].update(done=True, value=None)
    searcher.record.write(searcher.entries[0])
    resumed = _searcher(tmp_path)
    resumed.suggest("t2")
    resumed.on_trial_complete("t2", error=True)
    assert resumed.entries[0]["done"] is True and resumed.entries[0]["value"] is None and resumed.told == 1
