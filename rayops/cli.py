"""Pieces both command-line tools share: `validate`, spec loading with friendly errors, logging setup."""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click
from pydantic import BaseModel

from schemas.errors import (
    CheckpointError,
    LcscCheckfreeError,
    PluginError,
    ReferenceStatsError,
    SpecError,
    StateFileError,
)
from schemas.loader import load_spec

EXIT_SPEC_ERROR = 2  # bad input: a spec, a plug-in, a checkpoint, statistics or a state file
EXIT_RUN_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C: state is kept, the same command resumes
INPUT_ERRORS = (SpecError, PluginError, CheckpointError, ReferenceStatsError, StateFileError)
_ACTOR_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+Error): (.+)$")
_verbose = False


def setup_logging(verbose: bool = False) -> None:
    """Plain, timestamped logging to stderr; `verbose` adds debug logs and full tracebacks of errors."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def root_error(exc: BaseException) -> tuple[BaseException, str] | None:
    """The project error behind `exc` and its message: Ray's task errors are unwrapped to their cause, and an
    actor that died in its constructor is read from the error's text. None when no project error is behind it.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")  # loaded only when Ray is: no Ray, no Ray errors
    for _ in range(8):
        if (
            ray_exceptions
            and isinstance(exc, ray_exceptions.RayTaskError)
            and isinstance(exc.cause, BaseException)
        ):
            exc = exc.cause
        else:
            break
    if isinstance(exc, LcscCheckfreeError) and not (
        ray_exceptions and isinstance(exc, ray_exceptions.RayError)
    ):
        return exc, str(exc)
    if ray_exceptions and isinstance(exc, ray_exceptions.RayActorError):
        for line in reversed(str(exc).splitlines()):
            match = _ACTOR_ERROR_LINE.match(line)
            if match and match.group(1) in {cls.__name__ for cls in INPUT_ERRORS}:
                cls = next(c for c in INPUT_ERRORS if c.__name__ == match.group(1))
                return cls(match.group(2)), f"an actor failed to start: {match.group(2)}"
    return None


def load_or_exit(path: str | Path, model: type[BaseModel]) -> BaseModel:
    """Load a spec, or print its errors and exit with code 2."""
    try:
        return load_spec(path, model)
    except SpecError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_SPEC_ERROR)


def validate_command(
    model: type[BaseModel], check: Callable[[BaseModel], None] | None = None
) -> click.Command:
    """A `validate FILE` command for one spec model: prints OK, or the errors with exit code 2. `check(spec)`
    runs further checks of a valid spec (e.g. that its plug-ins import)."""

    @click.command("validate")
    @click.argument("spec_file", type=click.Path(dir_okay=False))
    def validate(spec_file: str) -> None:
        """Check a spec file (and that its plug-ins import) and print OK or every error."""
        spec = load_or_exit(spec_file, model)
        if check is not None:
            run_or_exit(check, spec)
        click.echo(f"OK: {spec_file} is a valid {model.__name__}")

    return validate


def _program() -> str:
    context = click.get_current_context(silent=True)
    return context.find_root().info_name if context is not None else "the command"


def run_or_exit(fn, *args, **kwargs):
    """Run `fn`; a project error (also one raised inside a Ray task or actor) is printed as one readable
    message, without a traceback unless `--verbose`: exit code 2 for bad input, 1 otherwise."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted; rerun the same command to resume"
        click.echo(f"interrupted: {message}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        found = root_error(exc)
        if found is None:
            raise  # not an error this project raises on purpose: a bug, shown in full
        error, message = found
        if _verbose:
            traceback.print_exception(exc)
        code = EXIT_SPEC_ERROR if isinstance(error, INPUT_ERRORS) else EXIT_RUN_ERROR
        hint = "" if _verbose else f" (`{_program()} --verbose ...` shows the traceback)"
        click.echo(f"error: {message}{hint}", err=True)
        sys.exit(code)


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
    @click.option(
        "--address",
        default=None,
        help="Ray dashboard URL (http://HEAD:8265); default $RAY_ADDRESS or a local head.",
    )
    @click.option("--wait/--no-wait", default=True, help="Follow the job's logs until it ends.")
    def submit(spec_file: str, address: str | None, wait: bool) -> None:
        spec = load_or_exit(spec_file, model)
        follow_job(run_or_exit(load_submit(), spec, address=address), wait, summarise)

    submit.help = f"Submit the {noun} SPEC_FILE as a Ray job."
    return submit
