"""A local Ray whose start timed out (crowded cores) is started again; any other start error is raised at once."""

from __future__ import annotations

import pytest

from rayops import session


class FakeRay:
    def __init__(self, errors):
        self.errors, self.inits, self.shutdowns = list(errors), [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)
        return "context"

    def shutdown(self):
        self.shutdowns += 1


def test_a_start_that_timed_out_is_tried_again_with_the_same_arguments(monkeypatch):
    fake = FakeRay([Exception("The current node timed out during startup. This could happen because ...")])
    monkeypatch.setattr(session, "ray", fake)
    monkeypatch.delenv(session.RAYLET_START_WAIT, raising=False)
    assert session.start_local_ray(num_cpus=2) == "context"
    assert fake.inits == [{"address": "local", "num_cpus": 2}] * 2 and fake.shutdowns == 1
    assert session.os.environ[session.RAYLET_START_WAIT] == session.LOCAL_RAYLET_START_WAIT_S


def test_other_errors_and_the_last_timeout_are_raised(monkeypatch):
    fake = FakeRay([ValueError("bad num_cpus")])
    monkeypatch.setattr(session, "ray", fake)
    with pytest.raises(ValueError, match="bad num_cpus"):
        session.start_local_ray(num_cpus=-1)
    assert len(fake.inits) == 1
    timeouts = [Exception("node timed out during startup")] * 3
    fake = FakeRay(timeouts)
    monkeypatch.setattr(session, "ray", fake)
    with pytest.raises(Exception, match="timed out"):
        session.start_local_ray(attempts=3)
    assert len(fake.inits) == 3 and fake.shutdowns == 2
