"""Shared fixtures: one local Ray per test session, a real SeaweedFS S3 server, a moto server; and two guards
against a hung test: a Ray cut by pytest-timeout is started afresh for the next test, and a test that
pytest-timeout could not stop (stuck in native code) dumps every thread's stack and ends the session, so a
hang is reported with its cause instead of holding the run until an outer limit."""

from __future__ import annotations

import faulthandler
import os
import sys
import uuid

import pytest

from rayops import settings

for _name, _value in settings.LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Fixtures shared by every test module. A session-scoped fixture imported into several modules would be one
# fixture per module (each its own instance), so these are registered here, once, and never imported.
pytest_plugins = ["tests.spot_cluster_fixtures"]

HARD_TIMEOUT_GRACE_S = (
    180  # past pytest-timeout's limit, a test still running is stuck where signals cannot reach
)
_guard: dict = {"ray_cut": False}


def pytest_configure(config):
    _guard["stderr"] = os.dup(sys.stderr.fileno())  # not captured: the dump must reach the run's log


def pytest_collection_modifyitems(session, config, items):
    """Refuse a test module that imported a shared session fixture (it would start one more of it); group the
    tests of each shared fixture for pytest-xdist, and under xdist hand out the `slow` tests first."""
    from tests.spot_cluster_fixtures import group_shared_fixture_users, modules_redefining_shared_fixtures

    modules = {id(item.module): item.module for item in items if getattr(item, "module", None) is not None}
    found = modules_redefining_shared_fixtures(modules.values())
    if found:
        raise pytest.UsageError(
            f"test modules import a shared session fixture ({', '.join(found)}): each would start its own; "
            "remove the import and name the fixture as an argument (tests/conftest.py registers it)"
        )
    group_shared_fixture_users(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the end-to-end runs first, so that the last tests handed out are short ones, not a two-minute run
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _timeout_of(item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _timeout_of(item)
    if limit > 0:
        faulthandler.dump_traceback_later(limit + HARD_TIMEOUT_GRACE_S, exit=True, file=_guard["stderr"])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and "ray_local" in item.fixturenames and "Timeout" in str(report.longrepr):
        _guard["ray_cut"] = True  # a Ray call interrupted by the timeout signal can leave the client unusable


def _start_ray():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="tests",
        object_store_memory=1_000_000_000,
    )


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the tests' Ray down at the end (it is started by `ray_local`, so that a start cut by a test's
    timeout is not cached as every later test's error)."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_module(_ray_session):
    """The tests' Ray for module-scoped fixtures (actors shared by a module's tests)."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    return ray


@pytest.fixture
def ray_local(_ray_session):
    """One local Ray instance (2 CPUs, loopback only) shared by every test that needs Ray; started afresh
    after a test that used it was cut by pytest-timeout."""
    import ray

    if _guard["ray_cut"] or not ray.is_initialized():
        _guard["ray_cut"] = False
        ray.shutdown()
        _start_ray()
    return ray


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback with access keys enforced; stopped by pid at the end."""
    from rayops.s3_server import start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's in-memory S3 server, for fast tests needing neither persistence nor auth."""
    from rayops.s3_server import start_moto

    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


def _bucket_env(server, monkeypatch):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(bucket)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(settings.STORAGE_MAX_ATTEMPTS, "2")
    return bucket


@pytest.fixture
def s3_bucket(seaweedfs, monkeypatch):
    """A fresh bucket on SeaweedFS, with the AWS variables pointing at it; yields 's3://bucket'."""
    yield f"s3://{_bucket_env(seaweedfs, monkeypatch)}"


@pytest.fixture
def moto_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server, with the AWS variables pointing at it; yields 's3://bucket'."""
    yield f"s3://{_bucket_env(moto_server, monkeypatch)}"
