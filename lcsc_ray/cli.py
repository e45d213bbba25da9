"""`lcsc-ray`: the command-line interface of the LCSC search."""

from __future__ import annotations

import click

from lcsc_ray.recipes.cli import recipe
from rayops import storage
from rayops.cli import follow_job, load_or_exit, run_or_exit, setup_logging, validate_command
from rayops.cluster_cli import cluster_group
from schemas.errors import CheckpointError, StorageError
from schemas.search import SearchSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Search linear combinations of saved checkpoints (LCSC) on Ray."""
    setup_logging(verbose)


def _check_spec(spec: SearchSpec) -> None:
    """Import every plug-in of the spec (a typo in a `target` fails validation, naming the field), check the
    diffusers sampler's kwargs, and, where the checkpoints can be listed, `search.budget` against their seed
    vectors."""
    from lcsc_ray.checkpoints import list_checkpoints
    from lcsc_ray.plugins import check_importable
    from lcsc_ray.run_identity import check_budget, check_sampler_kwargs, plugins

    check_importable(plugins(spec))
    check_sampler_kwargs(spec)
    try:
        found = list_checkpoints(spec.checkpoints)
    except (CheckpointError, StorageError) as exc:
        click.echo(
            f"note: the checkpoints were not listed ({' '.join(str(exc).split())[:300]}); `search.budget` "
            "is checked against their seed vectors when the search starts"
        )
        return
    if len(found) >= 2:
        check_budget(spec, len(found))


main.add_command(validate_command(SearchSpec, _check_spec))
main.add_command(recipe)
main.add_command(cluster_group)  # `cluster rehearse`: a local autoscaling spot cluster


RESTART_HELP = "Clear the output's stored search state and start over (needed when the inputs changed)."
FORCE_HELP = "Run a finished search again instead of printing its stored result."


@main.command("search")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--restart", is_flag=True, help=RESTART_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
def search_command(spec_file: str, restart: bool, force: bool) -> None:
    """Run (or resume) an LCSC search in this process and print the summary table; a finished search's
    stored result is printed without running it again."""
    from lcsc_ray.report import format_table
    from lcsc_ray.sdk import run_search

    spec = load_or_exit(spec_file, SearchSpec)
    result = run_or_exit(run_search, spec, restart=restart, force=force)
    click.echo(format_table(result))
    click.echo(
        f"results: {spec.output.uri if storage.is_remote(spec.output.uri) else result.files.get('result.json')}"
    )
    for name in ("fid_vs_evaluations.png", "coefficients.png", "samples.png", "combined.safetensors"):
        click.echo(f"  {name}: {result.files.get(name)}")


def _search_table(result) -> str:
    from lcsc_ray.report import format_table

    return format_table(result)


@main.command("submit")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option(
    "--address",
    default=None,
    help="Ray dashboard URL (http://HEAD:8265); default $RAY_ADDRESS or a local head.",
)
@click.option("--wait/--no-wait", default=True, help="Follow the job's logs until it ends.")
@click.option("--restart", is_flag=True, help=RESTART_HELP)
@click.option("--force", is_flag=True, help=FORCE_HELP)
def submit_search_command(
    spec_file: str, address: str | None, wait: bool, restart: bool, force: bool
) -> None:
    """Submit the search SPEC_FILE as a Ray job."""
    from lcsc_ray.sdk import submit_search

    spec = load_or_exit(spec_file, SearchSpec)
    handle = run_or_exit(submit_search, spec, address=address, restart=restart, force=force)
    follow_job(handle, wait, _search_table)


@main.command("combine")
@click.option(
    "--coefficients",
    "coefficients_file",
    required=True,
    help="JSON list, combined.json or result.json holding the coefficients.",
)
@click.option(
    "--checkpoints", "checkpoints_uri", help="Checkpoint directory or prefix (default: from --spec)."
)
@click.option(
    "--glob", "pattern", default="*.safetensors", show_default=True, help="Checkpoint file pattern."
)
@click.option("--last", type=int, default=None, help="Use only the last N checkpoints.")
@click.option("--key", default=None, help="State-dict key inside the checkpoint files.")
@click.option(
    "--spec", "spec_file", type=click.Path(dir_okay=False), help="Take the checkpoint set from a spec."
)
@click.option("--out", "out_uri", required=True, help="Output .safetensors path or URI.")
def combine_command(
    coefficients_file: str,
    checkpoints_uri: str | None,
    pattern: str,
    last: int | None,
    key: str | None,
    spec_file: str | None,
    out_uri: str,
) -> None:
    """Apply known coefficients to a checkpoint set and export the combined weights."""
    from lcsc_ray.export import export_combined, read_coefficients
    from schemas.search import CheckpointSetSpec

    if spec_file:
        checkpoints = load_or_exit(spec_file, SearchSpec).checkpoints
    elif checkpoints_uri:
        checkpoints = CheckpointSetSpec(uri=checkpoints_uri, glob=pattern, last=last, key=key)
    else:
        raise click.UsageError("give --checkpoints URI or --spec FILE")
    coefficients = run_or_exit(read_coefficients, coefficients_file)
    sidecar = run_or_exit(export_combined, checkpoints, coefficients, out_uri)
    click.echo(
        f"wrote {out_uri} from {len(sidecar['checkpoints'])} checkpoints (coefficients sum "
        f"{sidecar['sum']:.6f})"
    )


@main.command("report")
@click.argument("output_uri")
def report_command(output_uri: str) -> None:
    """Print the summary table of a finished search."""
    from lcsc_ray.report import format_table, load_result

    click.echo(format_table(run_or_exit(load_result, output_uri)))


@main.command("samples")
@click.argument("output_uri")
@click.option(
    "--candidate",
    default=None,
    help="best (default), last, ema, or a reported label such as uniform or best-sparse-ema@0.9.",
)
@click.option("--coefficients", default=None, help="Coefficients: a JSON list, or a file holding one.")
@click.option("--weights", "weights_uri", default=None, help="A combined.safetensors of this search instead.")
@click.option("--num", "num_samples", type=int, default=None, help="Samples (default: the reported count).")
@click.option("--seed", type=int, default=None, help="Noise seed of the evaluation (default: fid.seed).")
@click.option("--out", "out_dir", required=True, help="Folder or URI for the PNG files and samples.json.")
@click.option("--device", default=None, help="torch device (default: a GPU if the evaluators had one).")
@click.option(
    "--npz", is_flag=True, help="Also write samples.npz: the float samples the FID was computed from."
)
def samples_command(
    output_uri: str,
    candidate: str | None,
    coefficients: str | None,
    weights_uri: str | None,
    num_samples: int | None,
    seed: int | None,
    out_dir: str,
    device: str | None,
    npz: bool,
) -> None:
    """Write the exact samples a finished search scored for one candidate, and their FID (each chunk's noise
    seed is derived from (seed, chunk index): a pipeline seeded with the seed alone draws other samples)."""
    from lcsc_ray.sample_files import parse_coefficients, write_samples

    alphas = run_or_exit(parse_coefficients, coefficients) if coefficients is not None else None
    summary = run_or_exit(
        write_samples,
        output_uri,
        out_dir,
        candidate=candidate,
        coefficients=alphas,
        weights_uri=weights_uri,
        num_samples=num_samples,
        seed=seed,
        device=device,
        npz=npz,
    )
    reported = summary["reported_fid"]
    click.echo(
        f"wrote {summary['num_samples']} samples of {summary['candidate']} (seed {summary['seed']}) to {out_dir}; "
        f"FID {summary['fid']:.6f}"
        + (
            f", reported {reported:.6f}"
            if reported is not None
            else " (the search reported none at this n, seed)"
        )
    )


@main.command("demo")
@click.option("--spec", "spec_file", default=None, help="Search spec (default: examples/search_mnist.yaml).")
@click.option("--budget", type=int, default=None, help="Override the number of search evaluations.")
@click.option("--train-steps", type=int, default=None, help="Override the DDPM's training steps.")
def demo_command(spec_file: str | None, budget: int | None, train_steps: int | None) -> None:
    """Train (or reuse) the MNIST DDPM and run an LCSC search over its checkpoints on the local Ray."""
    from lcsc_ray.demo import describe, load_demo_spec, run_demo

    spec = run_or_exit(load_demo_spec, spec_file, budget)
    result = run_or_exit(run_demo, spec, train_steps)
    click.echo(describe(result, spec))
