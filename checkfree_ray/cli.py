"""`checkfree-ray`: the command-line interface of CheckFree pipeline training."""

from __future__ import annotations

import click

from rayops.cli import follow_job, load_or_exit, run_or_exit, setup_logging, validate_command
from schemas.train import TrainSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pipeline-parallel training on Ray that survives lost stages (CheckFree / CheckFree+)."""
    setup_logging(verbose)


main.add_command(validate_command(TrainSpec))


RESTART_HELP = ("Start a new run even if `output.uri` holds another run (of a different spec); without it a "
                "rerun of the same spec resumes, and a different spec is refused.")


@main.command("train")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help=RESTART_HELP)
def train(spec_file: str, restart: bool) -> None:
    """Run the training SPEC_FILE in this process and write its result (resuming the same spec's run)."""
    from checkfree_ray.train import run_training

    spec = load_or_exit(spec_file, TrainSpec)
    result = run_or_exit(run_training, spec, restart=restart)
    click.echo(_summary(result))


def _summary(result) -> str:
    return (f"final validation loss {result.final_val_loss}, {len(result.failures)} failure(s); "
            f"result: {result.files.get('result.json')}")


@main.command("submit")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--address", default=None,
              help="Ray dashboard URL (http://HEAD:8265); default $RAY_ADDRESS or a local head.")
@click.option("--wait/--no-wait", default=True, help="Follow the job's logs until it ends.")
@click.option("--restart", is_flag=True, help=RESTART_HELP)
def submit(spec_file: str, address: str | None, wait: bool, restart: bool) -> None:
    """Submit the training SPEC_FILE as a Ray job (resuming the same spec's run)."""
    from checkfree_ray.sdk import submit_training

    spec = load_or_exit(spec_file, TrainSpec)
    follow_job(run_or_exit(submit_training, spec, address=address, restart=restart), wait, _summary)


@main.command("demo")
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), default=None,
              help="Demo spec (default: examples/train_demo.yaml, else the built-in one).")
@click.option("--out", "out_dir", default=None, help="Output directory (default: the spec's output.uri).")
@click.option("--reference/--no-reference", default=True, help="Also run the same spec without failures.")
def demo_command(spec_file: str | None, out_dir: str | None, reference: bool) -> None:
    """A few minutes of CheckFree+ on the local Ray with stages killed on a schedule; prints a summary."""
    from checkfree_ray.demo import run_demo

    run_or_exit(run_demo, spec_file, out_dir, reference)
