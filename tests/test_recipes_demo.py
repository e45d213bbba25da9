"""The demo's training settings: its step count, evenly spaced checkpoints and every CPU of the local Ray."""

from __future__ import annotations

from lcsc_ray.demo import (
    DEFAULT_SPEC,
    DEMO_CHECKPOINTS,
    DEMO_TRAIN_STEPS,
    demo_training_config,
    load_demo_spec,
    training_cpus,
)


def test_demo_training_saves_the_checkpoints_its_spec_searches():
    """The default run and a shortened one both save DEMO_CHECKPOINTS checkpoints, more than the spec's `last`."""
    config = demo_training_config("/tmp/x")
    assert (config.steps, config.checkpoint_every) == (DEMO_TRAIN_STEPS, DEMO_TRAIN_STEPS // DEMO_CHECKPOINTS)
    assert config.steps // config.checkpoint_every == DEMO_CHECKPOINTS
    short = demo_training_config("/tmp/x", train_steps=250)
    assert (short.steps, short.checkpoint_every) == (250, 10)
    assert load_demo_spec(DEFAULT_SPEC).checkpoints.last <= DEMO_CHECKPOINTS


def test_demo_training_takes_every_cpu_of_the_local_ray(ray_local):
    """The demo's training task asks for all of Ray's CPUs (the test Ray has 2), so it trains on 2 threads."""
    assert training_cpus() == 2.0
