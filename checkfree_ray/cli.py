"""`checkfree-ray`: the command-line interface of CheckFree pipeline training."""

from __future__ import annotations

import click

from rayops.cli import follow_job, load_or_exit, run_or_exit, setup_logging, validate_command
from rayops.cluster_cli import cluster_group
from schemas.train import TrainSpec


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Pipeline-parallel training on Ray that survives lost stages (CheckFree / CheckFree+)."""
    setup_logging(verbose)


main.add_command(validate_command(TrainSpec))
main.add_command(cluster_group)  # `cluster rehearse`: a local autoscaling spot cluster


RESTART_HELP = (
    "Start a new run even if `output.uri` holds another run (of a different spec); without it a "
    "rerun of the same spec resumes, and a different spec is refused."
)


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
    return (
        f"final validation loss {result.final_val_loss}, {len(result.failures)} failure(s); "
        f"result: {result.files.get('result.json')}"
    )


@main.command("submit")
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option(
    "--address",
    default=None,
    help="Ray dashboard URL (http://HEAD:8265); default $RAY_ADDRESS or a local head.",
)
@click.option("--wait/--no-wait", default=True, help="Follow the job's logs until it ends.")
@click.option("--restart", is_flag=True, help=RESTART_HELP)
def submit(spec_file: str, address: str | None, wait: bool, restart: bool) -> None:
    """Submit the training SPEC_FILE as a Ray job (resuming the same spec's run)."""
    from checkfree_ray.sdk import submit_training

    spec = load_or_exit(spec_file, TrainSpec)
    follow_job(run_or_exit(submit_training, spec, address=address, restart=restart), wait, _summary)


@main.command("demo")
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Demo spec (default: examples/train_demo.yaml, else the built-in one).",
)
@click.option("--out", "out_dir", default=None, help="Output directory (default: the spec's output.uri).")
@click.option("--reference/--no-reference", default=True, help="Also run the same spec without failures.")
def demo_command(spec_file: str | None, out_dir: str | None, reference: bool) -> None:
    """A few minutes of CheckFree+ on the local Ray with stages killed on a schedule; prints a summary."""
    from checkfree_ray.demo import run_demo

    run_or_exit(run_demo, spec_file, out_dir, reference)


FORMAT_HELP = "Input format (default: by extension: .jsonl/.json jsonl, .parquet parquet, else text)."
FIELD_HELP = "jsonl field or parquet column holding the text."


@main.group("tokenizer")
def tokenizer_group() -> None:
    """Tokenizers for your corpus."""


@tokenizer_group.command("train")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_uri", required=True, help="Where tokenizer.json goes (local or s3://).")
@click.option(
    "--vocab-size",
    default=4096,
    show_default=True,
    type=click.IntRange(260, 1 << 20),
    help="Tokens in the vocabulary (256 bytes, <|endoftext|> and the merges).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "jsonl", "parquet"]), default=None, help=FORMAT_HELP
)
@click.option("--field", default="text", show_default=True, help=FIELD_HELP)
def tokenizer_train(
    inputs: tuple[str, ...], out_uri: str, vocab_size: int, fmt: str | None, field: str
) -> None:
    """Train a byte-level BPE tokenizer on INPUTS (files or folders, local or s3://)."""
    from checkfree_ray.tokenizing import train_tokenizer

    info = run_or_exit(train_tokenizer, list(inputs), out_uri, vocab_size=vocab_size, fmt=fmt, field=field)
    click.echo(
        f"tokenizer with {info['vocab_size']} tokens written to {info['uri']} (sha256 {info['sha256'][:12]})"
    )


@main.command("tokenize")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out", "out_uri", required=True, help="Token artifact folder (local or s3://): data.tokens_uri."
)
@click.option("--tokenizer", "tokenizer_uri", default=None, help="tokenizer.json (default: byte-level).")
@click.option(
    "--val-fraction",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 0.5, min_open=True),
    help="Last fraction of the tokens held out for validation (without --val).",
)
@click.option(
    "--val",
    "val_inputs",
    multiple=True,
    help="Validation files or folders (repeatable); replaces --val-fraction.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "jsonl", "parquet"]), default=None, help=FORMAT_HELP
)
@click.option("--field", default="text", show_default=True, help=FIELD_HELP)
def tokenize_command(
    inputs: tuple[str, ...],
    out_uri: str,
    tokenizer_uri: str | None,
    val_fraction: float,
    val_inputs: tuple[str, ...],
    fmt: str | None,
    field: str,
) -> None:
    """Tokenize INPUTS (text, jsonl or parquet files or folders, local or s3://) into one token artifact."""
    from checkfree_ray.tokenizing import tokenize

    index = run_or_exit(
        tokenize,
        list(inputs),
        out_uri,
        tokenizer_uri=tokenizer_uri,
        val_fraction=val_fraction,
        val_inputs=list(val_inputs) or None,
        fmt=fmt,
        field=field,
    )
    train, val = index["splits"]["train"], index["splits"]["val"]
    click.echo(
        f"{train[1] - train[0]} training and {val[1] - val[0]} validation tokens ({index['dtype']}, vocabulary "
        f"{index['vocab_size']}) in {out_uri}; set data.tokens_uri: {out_uri}"
    )


@main.command("hf-config")
@click.argument("out_uri")
@click.option("--hidden-size", default=128, show_default=True, type=click.IntRange(8))
@click.option("--layers", default=4, show_default=True, type=click.IntRange(1), help="num_hidden_layers.")
@click.option("--heads", default=4, show_default=True, type=click.IntRange(1), help="num_attention_heads.")
@click.option(
    "--kv-heads", default=None, type=click.IntRange(1), help="num_key_value_heads (default: --heads)."
)
@click.option(
    "--intermediate-size", default=None, type=click.IntRange(1), help="Default: 8/3 hidden, rounded."
)
@click.option(
    "--vocab-size", default=None, type=click.IntRange(2), help="Default: the --tokenizer's, else 256 (bytes)."
)
@click.option(
    "--tokenizer", "tokenizer_uri", default=None, help="tokenizer.json whose vocabulary to size for."
)
@click.option("--rope-theta", default=10000.0, show_default=True, type=float)
def hf_config(
    out_uri: str,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int | None,
    intermediate_size: int | None,
    vocab_size: int | None,
    tokenizer_uri: str | None,
    rope_theta: float,
) -> None:
    """Write a Hugging Face Llama config.json (no weights: a run starts it from its seed) into folder OUT_URI."""
    from checkfree_ray.data import tokenizer_size
    from checkfree_ray.hf_llama import write_config
    from checkfree_ray.model import ModelConfig
    from schemas.train import LlamaSpec

    vocab = vocab_size or (run_or_exit(tokenizer_size, tokenizer_uri) if tokenizer_uri else None)
    try:
        spec = LlamaSpec(
            d_model=hidden_size,
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=kv_heads,
            ffn_hidden=intermediate_size,
            rope_theta=rope_theta,
            vocab_size=vocab,
        )
    except ValueError as exc:  # pydantic's message names the field (model.n_kv_heads ...)
        raise click.UsageError(str(exc)) from None
    cfg = ModelConfig.from_spec(spec, num_stages=1)
    uri = run_or_exit(write_config, out_uri, cfg)
    click.echo(f"wrote {uri} ({cfg.parameter_count() / 1e6:.2f}M parameters); set model.hf_path: {out_uri}")
