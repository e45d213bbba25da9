"""Ray session: start a local Ray when no address is given, reuse an initialised one, shut down only ours."""

from __future__ import annotations

import ray

from rayops.session import ray_session, resolve_address
from schemas.common import RaySpec


def test_address_precedence(monkeypatch):
    """The spec's address wins over $RAY_ADDRESS; neither means local."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(RaySpec()) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_address(RaySpec()) == "127.0.0.1:6379"
    assert resolve_address(RaySpec(address="auto")) == "auto"


def test_reuses_initialised_ray_and_leaves_it_running(ray_local):
    """Inside a process that already runs Ray, the session neither starts nor stops it."""
    with ray_session(RaySpec()) as info:
        assert not info.started_here
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
    assert ray.is_initialized()
