"""`checkfree-ray`: the command-line interface of CheckFree pipeline training."""

from __future__ import annotations

import click

from rayops.cli import setup_logging, validate_command
from schemas.train import TrainSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pipeline-parallel training on Ray that survives lost stages (CheckFree / CheckFree+)."""
    setup_logging(verbose)


main.add_command(validate_command(TrainSpec))
