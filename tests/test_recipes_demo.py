"""The demo's settings: a shortened training run still saves the checkpoints its search spec asks for."""

from __future__ import annotations

from lcsc_ray.demo import demo_train_config, load_demo_spec, training_output


def test_shortened_demo_training_keeps_the_checkpoint_count():
    """--train-steps 50 saves every 2 steps (25 checkpoints, as the default run), enough for the spec's `last`."""
    spec = load_demo_spec()
    default = demo_train_config(spec)
    short = demo_train_config(spec, train_steps=50)
    assert short.steps == 50 and short.checkpoint_every == 2
    assert short.steps // short.checkpoint_every == default.steps // default.checkpoint_every
    assert short.steps // short.checkpoint_every >= spec.checkpoints.last
    assert demo_train_config(spec, train_steps=3).checkpoint_every == 1
    assert short.out == default.out == training_output(spec) == "outputs/mnist-ddpm"
