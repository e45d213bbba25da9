"""`lcsc-ray`: the command-line interface of the LCSC search."""

from __future__ import annotations

import click

from rayops.cli import setup_logging, validate_command
from schemas.search import SearchSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Search linear combinations of saved checkpoints (LCSC) on Ray."""
    setup_logging(verbose)


main.add_command(validate_command(SearchSpec))
