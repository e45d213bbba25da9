"""Pieces both command-line tools share: `validate`, spec loading with friendly errors, logging setup."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from pydantic import BaseModel

from schemas.errors import LcscCheckfreeError, SpecError
from schemas.loader import load_spec

EXIT_SPEC_ERROR = 2
EXIT_RUN_ERROR = 1


def setup_logging(verbose: bool = False) -> None:
    """Plain, timestamped logging to stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def load_or_exit(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Load a spec, or print its errors and exit with code 2."""
    try:
        return load_spec(path, model)
    except SpecError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_SPEC_ERROR)


def validate_command(model: type[BaseModel]) -> click.Command:
    """A `validate FILE` command for one spec model: prints OK, or the errors with exit code 2."""

    @click.command("validate")
    @click.argument("spec_file", type=click.Path(dir_okay=False))
    def validate(spec_file: str) -> None:
        """Check a spec file and print OK or every error."""
        load_or_exit(spec_file, model)
        click.echo(f"OK: {spec_file} is a valid {model.__name__}")

    return validate


def run_or_exit(fn, *args, **kwargs):
    """Run `fn`; a project error is printed as one readable message with exit code 1 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except SpecError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_SPEC_ERROR)
    except LcscCheckfreeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_RUN_ERROR)


def follow_job(handle, wait: bool, summarise) -> None:
    """Print the job id, then (with `wait`, or when the handle owns a local head) follow its logs and print
    `summarise(result)`; the local head is closed at the end."""
    click.echo(f"submitted job {handle.job_id}")
    if not wait:
        if handle.head is None:
            return
        click.echo("note: the local head lives as long as this command; waiting for the job", err=True)
    try:
        run_or_exit(handle.wait, echo=True)
        click.echo(summarise(handle.result()))
    finally:
        handle.close()


def submit_command(model: type[BaseModel], load_submit, summarise, noun: str) -> click.Command:
    """A `submit SPEC_FILE [--address] [--wait/--no-wait]` command; `load_submit()` returns the SDK's
    submit function (imported lazily), `summarise(result)` the line printed at the end."""

    @click.command("submit")
    @click.argument("spec_file", type=click.Path(dir_okay=False))
    @click.option("--address", default=None,
                  help="Ray dashboard URL (http://HEAD:8265); default $RAY_ADDRESS or a local head.")
    @click.option("--wait/--no-wait", default=True, help="Follow the job's logs until it ends.")
    def submit(spec_file: str, address: str | None, wait: bool) -> None:
        spec = load_or_exit(spec_file, model)
        follow_job(run_or_exit(load_submit(), spec, address=address), wait, summarise)

    submit.help = f"Submit the {noun} SPEC_FILE as a Ray job."
    return submit
