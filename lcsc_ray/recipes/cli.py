"""`python -m lcsc_ray.recipes` and `lcsc-ray recipe`: train the built-in MNIST models, check the feature net."""

from __future__ import annotations

import json

import click

from rayops.cli import run_or_exit

RUN_OPTIONS = [
    click.option("--out", default=None, help="Output directory (local path or s3:// URI)."),
    click.option("--steps", type=int, default=None, help="Total optimizer steps."),
    click.option("--batch-size", type=int, default=None, help="Images per step."),
    click.option("--lr", type=float, default=None, help="Peak learning rate."),
    click.option("--checkpoint-every", type=int, default=None, help="Checkpoint interval in steps."),
    click.option("--ema-decay", type=float, default=None, help="Online EMA decay."),
    click.option("--seed", type=int, default=None, help="Seed of weights, data order and noise."),
    click.option("--model-json", default=None, help="U-Net kwargs as JSON, e.g. '{\"channels\": [16, 32]}'."),
    click.option(
        "--local/--ray",
        "local",
        default=False,
        help="Train in this process instead of as a Ray task (default: Ray; $RAY_ADDRESS or local).",
    ),
]


def _with_run_options(fn):
    for option in reversed(RUN_OPTIONS):
        fn = option(fn)
    return fn


def _config(options: dict, extra: dict | None = None) -> dict:
    config = {k: v for k, v in options.items() if v is not None and k not in ("local", "model_json")}
    if options.get("model_json"):
        config["model"] = json.loads(options["model_json"])
    config.update({k: v for k, v in (extra or {}).items() if v is not None})
    return config


def _run(kind: str, config: dict, local: bool) -> None:
    from lcsc_ray.recipes import train

    if local:
        fn, _ = train.TRAINERS[kind]
        summary = run_or_exit(fn, config)
    else:
        summary = run_or_exit(train.train_on_ray, kind, config)
    click.echo(json.dumps(summary, indent=2))


@click.group("recipe")
def recipe() -> None:
    """Built-in MNIST recipes: train the DDPM and the consistency model whose checkpoints LCSC combines."""


@recipe.command("train-ddpm")
@_with_run_options
def train_ddpm_command(**options) -> None:
    """Train the MNIST DDPM (resumes when OUT holds an interrupted run)."""
    _run("ddpm", _config(options), options["local"])


@recipe.command("train-consistency")
@_with_run_options
@click.option("--teacher", "teacher_uri", default=None, help="DDPM weights to distil (default: its EMA).")
def train_consistency_command(teacher_uri: str | None, **options) -> None:
    """Distil the MNIST DDPM into a consistency model (resumes when OUT holds an interrupted run)."""
    _run("consistency", _config(options, {"teacher_uri": teacher_uri}), options["local"])


@recipe.command("feature-net")
def feature_net_command() -> None:
    """Train (or load from the cache) the FID feature network and print its holdout accuracy."""
    from lcsc_ray.recipes.features import FeatureNetConfig, cached_feature_network

    _, metadata = cached_feature_network(FeatureNetConfig())
    click.echo(json.dumps(metadata, indent=2))


def main() -> None:
    """Entry point of `python -m lcsc_ray.recipes`."""
    from rayops.cli import setup_logging

    setup_logging()
    recipe(prog_name="python -m lcsc_ray.recipes")
