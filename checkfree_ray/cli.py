"""`checkfree-ray`: the command-line interface of CheckFree pipeline training."""

from __future__ import annotations

import click

from rayops.cli import load_or_exit, run_or_exit, setup_logging, validate_command
from schemas.train import TrainSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pipeline-parallel training on Ray that survives lost stages (CheckFree / CheckFree+)."""
    setup_logging(verbose)


main.add_command(validate_command(TrainSpec))


@main.command("train")
@click.argument("spec_file", type=click.Path(dir_okay=False))
def train(spec_file: str) -> None:
    """Run the training SPEC_FILE in this process and write its result."""
    from checkfree_ray.train import run_training

    spec = load_or_exit(spec_file, TrainSpec)
    result = run_or_exit(run_training, spec)
    click.echo(f"final validation loss {result.final_val_loss}, {len(result.failures)} failure(s); "
               f"result: {result.files.get('result.json')}")
