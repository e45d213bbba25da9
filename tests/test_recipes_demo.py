"""The demo's training settings: its step count, evenly spaced checkpoints, every CPU of the local Ray, and the
feature network built beside the training."""

from __future__ import annotations

import logging

from lcsc_ray.demo import (
    DEFAULT_SPEC,
    DEMO_CHECKPOINTS,
    DEMO_TRAIN_STEPS,
    demo_training_config,
    load_demo_spec,
    training_cpus,
    wait_warmed,
    warm_feature_network,
)
from schemas.common import PluginSpec


def test_demo_training_saves_the_checkpoints_its_spec_searches():
    """The default run and a shortened one both save DEMO_CHECKPOINTS checkpoints, more than the spec's `last`."""
    config = demo_training_config("/tmp/x")
    assert (config.steps, config.checkpoint_every) == (DEMO_TRAIN_STEPS, DEMO_TRAIN_STEPS // DEMO_CHECKPOINTS)
    assert config.steps // config.checkpoint_every == DEMO_CHECKPOINTS
    short = demo_training_config("/tmp/x", train_steps=250)
    assert (short.steps, short.checkpoint_every) == (250, 250 // DEMO_CHECKPOINTS)
    assert load_demo_spec(DEFAULT_SPEC).checkpoints.last <= DEMO_CHECKPOINTS


def test_demo_training_takes_every_cpu_of_the_local_ray(ray_local):
    """The demo's training task asks for all of Ray's CPUs (the test Ray has 2), so it trains on 2 threads."""
    assert training_cpus() == 2.0


def test_the_feature_network_is_built_beside_the_training_and_a_failure_there_only_warns(ray_local, caplog):
    """The background build runs the spec's `fid.features` plug-in in a Ray task; a plug-in that fails there
    is logged (the search builds, and reports on, the network itself) instead of stopping the demo."""
    spec = load_demo_spec(DEFAULT_SPEC)
    ok = spec.model_copy(
        update={"fid": spec.fid.model_copy(update={"features": PluginSpec(target="torch.nn:Identity")})}
    )
    assert wait_warmed(warm_feature_network(ok)) == "torch.nn:Identity"
    bad = spec.model_copy(
        update={
            "fid": spec.fid.model_copy(
                update={"features": PluginSpec(target="lcsc_ray.no_such_module:features")}
            )
        }
    )
    with caplog.at_level(logging.WARNING, logger="lcsc_ray.demo"):
        assert wait_warmed(warm_feature_network(bad)) is None
    assert "building the feature network ahead of the search failed" in caplog.text
