"""A local autoscaling spot cluster for slow tests, started once per session and shared.

tests/conftest.py registers this module (`pytest_plugins`), so a test just names `spot_cluster` as an argument and
every slow spot test shares one cluster. Do not import the fixture into a test module: pytest would then make it a
fixture of that module, with a cluster of its own. Import the helpers (`start_driver`, `driver_env`) as usual.
The cluster is separate from the tests' own in-process Ray: talk to it from a subprocess driver
(`run_driver`) or through its GCS address (`rayops.cluster_nodes`), never with `ray.init` in the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayops import settings
from rayops.spot_cluster import LocalSpotCluster, processes_of

ROOT = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_S = 10.0  # short, so a test sees the cluster shrink back to its head


@pytest.fixture(scope="session")
def spot_cluster():
    """A running LocalSpotCluster shaped like cluster/aws-spot.yaml (3 one-CPU workers at most); at the end it
    is stopped and checked: no process of it left, its temp dir gone."""
    cluster = LocalSpotCluster(max_workers=3, idle_timeout_s=IDLE_TIMEOUT_S)
    cluster.start()
    temp_dir = cluster.temp_dir
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not processes_of(temp_dir), f"processes of the spot cluster in {temp_dir} outlived stop()"
        assert not os.path.exists(temp_dir), f"stop() left the spot cluster's temp dir {temp_dir}"


SHARED_FIXTURES = ("spot_cluster",)  # registered once by tests/conftest.py; never imported into a test module


def modules_redefining_shared_fixtures(modules) -> list[str]:
    """'module: fixture' for each test module that holds one of SHARED_FIXTURES (imported it), which would give
    that module a session fixture of its own."""
    return [
        f"{module.__name__}: {name}"
        for module in modules
        for name in SHARED_FIXTURES
        if getattr(module, name, None) is globals()[name]
    ]


def group_shared_fixture_users(items) -> None:
    """Mark each test that uses a SHARED_FIXTURES fixture with an xdist group of that fixture's name, so that
    under `pytest -n N --dist loadgroup` (`make test`) they all run in one worker, with one instance of it."""
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))


def driver_env() -> dict[str, str]:
    """Environment for a driver subprocess: loopback Ray settings, no inherited RAY_ADDRESS."""
    env = {**os.environ, **settings.LOCAL_RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop(settings.RAY_ADDRESS, None)
    return env


def start_driver(gcs_address: str, code: str, log_path: Path) -> subprocess.Popen:
    """Run `code` (which may use the name GCS) as a Ray driver of the cluster, in its own process."""
    program = f"GCS = {gcs_address!r}\n{code}"
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", program], env=driver_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
