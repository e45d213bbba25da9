"""Stage actors use their node's storage credentials unless the spec asks for the driver's."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from checkfree_ray.checkpoint_store import storage_env
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.run_identity import new_identity
from rayops.jobs import CREDENTIAL_ENV, forwarded_env
from tests.test_checkfree_engine import run_steps, tiny_spec

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def driver_keys(monkeypatch):
    """The driver's own AWS keys (distinct values, set after the tests' Ray started) and a region."""
    keys = {
        "AWS_ACCESS_KEY_ID": f"driver-id-{uuid.uuid4().hex[:8]}",
        "AWS_SECRET_ACCESS_KEY": f"driver-secret-{uuid.uuid4().hex}",
        "AWS_SESSION_TOKEN": f"driver-token-{uuid.uuid4().hex}",
    }
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    return keys


def test_storage_env_sends_settings_and_keys_only_when_asked(driver_keys, monkeypatch):
    """By default the stages get the endpoint, region and knobs, never a key; with the flag, the keys too."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_PROFILE", "driver-profile")  # names the driver's credentials: never sent
    plain = storage_env()
    assert plain["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and plain["AWS_DEFAULT_REGION"] == "eu-west-3"
    assert not set(plain) & {*CREDENTIAL_ENV, "AWS_PROFILE"}
    assert {
        k: v for k, v in storage_env(forward_credentials=True).items() if k in CREDENTIAL_ENV
    } == driver_keys
    assert not set(forwarded_env()) & set(CREDENTIAL_ENV)
    assert forwarded_env()["AWS_DEFAULT_REGION"] == "eu-west-3"


def test_forwarding_credentials_is_not_part_of_the_run_identity():
    """Turning `storage.forward_credentials` on for a resume keeps the run's fingerprint (no value changes)."""
    off, on = tiny_spec("checkfree"), tiny_spec("checkfree", storage={"forward_credentials": True})
    assert new_identity(off).fingerprint == new_identity(on).fingerprint


@pytest.mark.parametrize(
    "forward, transport", [(False, "object_store"), (True, "object_store"), (True, "gloo")]
)
def test_stage_actor_env_has_the_driver_secret_only_when_the_spec_asks(
    ray_local, tmp_path, driver_keys, caplog, forward, transport
):
    """After checkpoint saves by the stages, their environment holds the driver's secret only with
    `storage.forward_credentials` (also on direct-transport actors); the secret is never logged."""
    spec = tiny_spec(
        "checkfree",
        checkpointing={"every": 1},
        storage={"forward_credentials": forward},
        pipeline={"num_stages": 2, "activation_transport": transport},
    )
    executor = PipelineExecutor(spec, checkpoint_uri=str(tmp_path / "ckpt"))
    try:
        with caplog.at_level(logging.DEBUG):
            executor.start()
            run_steps(executor, 2)
            assert executor.finish_checkpoints() == 2  # the stages wrote their shards
            envs = [
                ray_local.get(a.__ray_call__.remote(lambda worker: dict(os.environ)), timeout=60)
                for a in executor.actors
            ]
    finally:
        executor.shutdown()
    secret = driver_keys["AWS_SECRET_ACCESS_KEY"]
    for env in envs:
        assert env.get("AWS_DEFAULT_REGION") == "eu-west-3"  # a setting: always sent
        if forward:
            assert {name: env.get(name) for name in driver_keys} == driver_keys
        else:
            assert secret not in env.values() and driver_keys["AWS_SESSION_TOKEN"] not in env.values()
    assert secret not in caplog.text
