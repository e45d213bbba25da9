"""Shared fixtures: one local Ray per test session, a real SeaweedFS S3 server, a moto server."""

from __future__ import annotations

import os
import uuid

import pytest

from rayops import settings

for _name, _value in settings.LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, loopback only) shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="tests",
                 object_store_memory=1_000_000_000)
    yield ray
    ray.shutdown()


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
