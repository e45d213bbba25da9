"""Corpora to token files: `checkfree-ray tokenizer train` and `checkfree-ray tokenize`.

Inputs are text, jsonl (one JSON object a line, text under a named field) or parquet (a named string column)
files, local or s3://, or folders of them. Everything streams: text and jsonl in 1 MiB reads, parquet in
pyarrow record batches, and tokens are appended to a local file as they come, so a corpus larger than memory
goes through. The output is one artifact (`rayops.artifacts.write_artifact`, manifest last):

- `tokens.bin`: every token, nanoGPT's `.bin` convention (flat little-endian uint16, or uint32 when the
  vocabulary exceeds 65536), training documents first, then validation ones;
- `index.json`: dtype, vocabulary size, token counts and the `[start, end)` token range of each split, and the
  tokenizer's sha256 (`checkfree_ray.data.TokenCorpus` memory-maps the file and checks all of it).

Byte-level (no tokenizer) is the default: each UTF-8 byte is a token, documents joined by a blank line.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from checkfree_ray.checkpoint_store import absolute_uri
from rayops import storage
from rayops.artifacts import sha256_hex, write_artifact
from rayops.progress import ProgressLine
from schemas.errors import SpecError

CHUNK_BYTES = 1 << 20
INDEX_VERSION = 1
END_OF_TEXT = "<|endoftext|>"
FORMATS = ("text", "jsonl", "parquet")


def is_hidden(relative: str) -> bool:
    """Whether a path relative to an input folder is hidden: any of its parts starts with '.' (`.git/`,
    `.ipynb_checkpoints/`, `.DS_Store`)."""
    return any(part.startswith(".") for part in relative.split("/") if part)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Input URIs with folders replaced by their visible files (sorted; hidden files and everything in hidden
    folders below the input are skipped); a missing input is an error naming it."""
    files: list[str] = []
    for uri in inputs:
        if storage.parse_uri(uri).scheme == "file" and Path(storage.parse_uri(uri).path).is_file():
            files.append(uri)
            continue
        base = uri.rstrip("/")
        listed = [u for u in storage.list_uris(uri) if not is_hidden(u[len(base) :])]
        if listed:
            files += listed
        elif storage.exists(uri):
            files.append(uri)
        else:
            raise SpecError(f"input {uri} does not exist (a file or folder of text, jsonl or parquet files)")
    return files


def file_format(uri: str, fmt: str | None) -> str:
    """`fmt`, or the format its extension says (.jsonl/.json: jsonl, .parquet: parquet, else text)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise SpecError(f"--format {fmt!r} is not one of {list(FORMATS)}")
        return fmt
    name = uri.lower()
    return (
        "jsonl" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"
    )


def _byte_chunks(uri: str) -> Iterator[bytes]:
    """The object at `uri` in CHUNK_BYTES reads (bounded memory, local or s3://)."""
    start = 0
    while True:
        chunk = storage.read_range(uri, start, CHUNK_BYTES)
        if not chunk:
            return
        yield chunk
        start += len(chunk)


def _lines(uri: str) -> Iterator[bytes]:
    rest = b""
    for chunk in _byte_chunks(uri):
        *whole, rest = (rest + chunk).split(b"\n")
        yield from whole
    if rest:
        yield rest


def iter_documents(uri: str, fmt: str | None = None, field: str = "text") -> Iterator[str]:
    """Documents of one file: a text file is one document (read in pieces); jsonl and parquet give one per row."""
    kind = file_format(uri, fmt)
    if kind == "text":
        pending = b""
        for chunk in _byte_chunks(uri):  # pieces end at a newline so that no UTF-8 character is split
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut].decode("utf-8", errors="replace")
                pending = pending[cut:]
        if pending:
            yield pending.decode("utf-8", errors="replace")
        return
    if kind == "jsonl":
        for number, line in enumerate(_lines(uri), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[field]
            except (ValueError, KeyError, TypeError) as exc:
                raise SpecError(
                    f"{uri} line {number}: no string field {field!r} ({type(exc).__name__}: {exc}); "
                    "name the field with --field"
                ) from None
            yield str(value)
        return
    yield from _parquet_documents(uri, field)


def _parquet_documents(uri: str, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        local = (
            storage.parse_uri(uri).path
            if storage.parse_uri(uri).scheme == "file"
            else Path(tmp) / "in.parquet"
        )
        if storage.parse_uri(uri).scheme != "file":
            storage.download_file(uri, local)
        handle = pq.ParquetFile(local)
        if column not in handle.schema_arrow.names:
            raise SpecError(
                f"{uri} has no column {column!r} (it has {handle.schema_arrow.names}); name it with --field"
            )
        for batch in handle.iter_batches(columns=[column], batch_size=1024):
            yield from (str(value) for value in batch.column(0).to_pylist() if value is not None)


def _documents(inputs: list[str], fmt: str | None, field: str) -> Iterator[str]:
    for uri in expand_inputs(inputs):
        yield from iter_documents(uri, fmt, field)


def train_tokenizer(
    inputs: list[str], out_uri: str, vocab_size: int = 4096, fmt: str | None = None, field: str = "text"
) -> dict:
    """Train a byte-level BPE (`tokenizers`) on the inputs and write its tokenizer.json to `out_uri`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_documents(inputs, fmt, field), trainer=trainer)
    data = tokenizer.to_str().encode()
    storage.write_bytes(out_uri, data)
    return {"uri": out_uri, "vocab_size": tokenizer.get_vocab_size(), "sha256": sha256_hex(data)}


class _Encoder:
    """Text -> token ids: a tokenizer.json (end-of-text id after each document) or UTF-8 bytes."""

    def __init__(self, tokenizer_uri: str | None):
        self.uri, self.sha256, self.tokenizer, self.eot = tokenizer_uri, None, None, None
        self.vocab_size = 256
        if tokenizer_uri is not None:
            from checkfree_ray.data import load_tokenizer

            self.tokenizer, self.sha256 = load_tokenizer(tokenizer_uri, field="--tokenizer")
            self.vocab_size = self.tokenizer.get_vocab_size()
            self.eot = self.tokenizer.token_to_id(END_OF_TEXT)

    def encode(self, text: str, last_piece: bool) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8")) + (list(b"\n\n") if last_piece else [])
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eot] if last_piece and self.eot is not None else ids


def tokenize(
    inputs: list[str],
    out_uri: str,
    tokenizer_uri: str | None = None,
    val_fraction: float = 0.05,
    val_inputs: list[str] | None = None,
    fmt: str | None = None,
    field: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize the inputs into the token artifact at `out_uri`; returns its index.

    The validation split is `val_inputs` when given, else the last `val_fraction` of the training tokens
    (rounded to a whole token)."""
    encoder = _Encoder(tokenizer_uri)
    dtype = np.uint16 if encoder.vocab_size <= 1 << 16 else np.uint32
    line = ProgressLine("tokenize") if progress else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        with open(path, "wb") as handle:
            n_train = _append(handle, inputs, encoder, dtype, fmt, field, line)
            n_val = _append(handle, val_inputs, encoder, dtype, fmt, field, line) if val_inputs else 0
        if not val_inputs:
            n_val = round(n_train * val_fraction)
            n_train -= n_val
        index = {
            "version": INDEX_VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": encoder.vocab_size,
            "tokens": n_train + n_val,
            "splits": {"train": [0, n_train], "val": [n_train, n_train + n_val]},
            # resolved: a run started from another working directory must find it
            "tokenizer": {"uri": absolute_uri(encoder.uri), "sha256": encoder.sha256}
            if encoder.uri
            else "bytes",
            "eot_id": encoder.eot,
            "inputs": list(inputs),
            "val_inputs": list(val_inputs or []),
        }
        if min(n_train, n_val) <= 0:
            raise SpecError(
                f"tokenizing {inputs} gives {n_train} training and {n_val} validation tokens; give more "
                "text, a larger --val-fraction or --val files"
            )
        write_artifact(
            out_uri,
            {"tokens.bin": path, "index.json": json.dumps(index, indent=2).encode()},
            metadata={"kind": "tokens"},
        )
    if line is not None:
        line.emit(f"tokenize: wrote {n_train} training and {n_val} validation tokens to {out_uri}")
    return index


def _append(
    handle, inputs: list[str], encoder: _Encoder, dtype, fmt, field, line: ProgressLine | None
) -> int:
    """Append the inputs' tokens to `handle`; returns how many."""
    count = 0
    for uri in expand_inputs(inputs):
        kind = file_format(uri, fmt)
        pieces = iter_documents(uri, fmt, field)
        piece = next(pieces, None)
        while piece is not None:
            following = next(pieces, None)
            last = kind != "text" or following is None  # a text file's pieces are one document
            ids = np.asarray(encoder.encode(piece, last), dtype=np.int64)
            handle.write(ids.astype(dtype).tobytes())
            count += len(ids)
            piece = following
            if line is not None:
                line.update(done=count, file=Path(storage.parse_uri(uri).path).name)
    return count
