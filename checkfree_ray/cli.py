"""`checkfree-ray`: the command-line interface of CheckFree pipeline training."""

from __future__ import annotations

import click

from rayops.cli import load_or_exit, run_or_exit, setup_logging, submit_command, validate_command
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
    click.echo(_summary(result))


def _summary(result) -> str:
    return (f"final validation loss {result.final_val_loss}, {len(result.failures)} failure(s); "
            f"result: {result.files.get('result.json')}")


def _submit_training():
    from checkfree_ray.sdk import submit_training

    return submit_training


main.add_command(submit_command(TrainSpec, _submit_training, _summary, "training"))


@main.command("demo")
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None,
              help="Demo spec (default: examples/train_demo.yaml, else the built-in one).")
@click.option("--out", "out_dir", default=None, help="Output directory (default: the spec's output.uri).")
@click.option("--reference/--no-reference", default=True, help="Also run the same spec without failures.")
def demo_command(spec_file: str | None, out_dir: str | None, reference: bool) -> None:
    """A few minutes of CheckFree+ on the local Ray with stages killed on a schedule; prints a summary."""
    from checkfree_ray.demo import run_demo

    run_or_exit(run_demo, spec_file, out_dir, reference)
