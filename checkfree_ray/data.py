"""Byte-level text that ships with Python, split into train and a held-out validation tail; batches by seed.

Every random draw of a run comes from its own stream of `np.random.SeedSequence(seed)`: data order,
validation windows and failure draws never correlate, and each step's draw is a pure function of
(seed, stream, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

from rayops import storage
from schemas.errors import SpecError
from schemas.train import DataSpec

log = logging.getLogger(__name__)
DATA_STREAM, VALIDATION_STREAM, FAILURE_STREAM = 0, 1, 2


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The generator of `step` in `stream`: child `step` of child `stream` of `SeedSequence(seed)`.

    Equal to `SeedSequence(seed).spawn(stream + 1)[stream].spawn(step + 1)[step]`, without spawning the others.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, step)))


@functools.lru_cache(maxsize=4)
def load_text_bytes(source: str) -> bytes:
    """'python-docs': pydoc_data topics (~465k chars of prose); 'python-stdlib': the stdlib's .py files."""
    if source == "python-docs":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    if source == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py"))
        return b"\n\n".join(p.read_bytes() for p in files)
    raise ValueError(f"unknown data.source {source!r}; use 'python-docs' or 'python-stdlib'")


class WindowCorpus:
    """Train and validation token arrays; `train_batch(step)` is a pure function of (seed, step).

    The arrays may be memory maps: a batch reads only the windows it draws (fancy indexing touches those pages).
    The driver builds each batch and sends the inputs to stage 0 and the targets to the last stage.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, seed: int, name: str = "data"):
        self.train, self.val = train, val
        self.seq_len, self.seed, self.name = seq_len, seed, name
        if len(self.train) <= seq_len + 1 or len(self.val) <= seq_len + 1:
            raise SpecError(
                f"{name}: {len(self.train)} training and {len(self.val)} validation tokens; each split "
                f"needs more than `model.seq_len` + 1 ({seq_len + 1}): give more text or a larger "
                "validation split"
            )

    def _windows(
        self, data: np.ndarray, starts: np.ndarray, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, ...]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = torch.from_numpy(np.asarray(data[idx]).astype(np.int64)).view(*shape, self.seq_len + 1)
        return windows[..., :-1].contiguous(), windows[..., 1:].contiguous()  # inputs, targets (M, B, T)

    def train_batch(
        self, step: int, micro_batches: int, micro_batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (M, B, T) of one step; the same (seed, step) always gives the same batch."""
        rng = step_rng(self.seed, DATA_STREAM, step)
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=micro_batches * micro_batch_size)
        return self._windows(self.train, starts, (micro_batches, micro_batch_size))

    def val_batches(self, count: int, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed validation set of `count` micro-batches (M, B, T), the same at every evaluation."""
        rng = step_rng(self.seed, VALIDATION_STREAM, 0)
        starts = rng.integers(0, len(self.val) - self.seq_len - 1, size=count * micro_batch_size)
        return self._windows(self.val, starts, (count, micro_batch_size))


class ByteCorpus(WindowCorpus):
    """Byte-level text that ships with Python, the last `val_fraction` held out."""

    def __init__(self, spec: DataSpec, seq_len: int, seed: int):
        data = np.frombuffer(load_text_bytes(spec.source), dtype=np.uint8)
        split = int(len(data) * (1.0 - spec.val_fraction))
        if len(data) - split <= seq_len + 1:
            raise ValueError(
                f"data.val_fraction {spec.val_fraction} leaves too little text for seq_len {seq_len}"
            )
        super().__init__(data[:split], data[split:], seq_len, seed, name=f"data.source {spec.source}")


INDEX_MAX_BYTES = 1_000_000
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
TOKEN_CACHE_ENV = (
    "CHECKFREE_TOKEN_CACHE"  # local folder for token files copied from s3:// (default: a temp dir)
)


def _bad_tokens(uri: str, problem: str) -> SpecError:
    return SpecError(
        f"token file {uri} {problem} (`data.tokens_uri`); write it again with `checkfree-ray tokenize`"
    )


def read_index(tokens_uri: str) -> dict:
    """The checked `index.json` of a token artifact: dtype, vocabulary, splits within `tokens.bin`'s size.

    The manifest is read on every call; the parsed index is cached by index.json's sha256 in it, so an artifact
    written again at the same URI (in a notebook, an SDK session) is read again instead of served stale."""
    from rayops.artifacts import read_manifest

    manifest = read_manifest(tokens_uri)
    files = manifest["files"]
    entry = files.get("index.json")
    if entry is None or entry["size"] > INDEX_MAX_BYTES or "tokens.bin" not in files:
        raise _bad_tokens(
            tokens_uri, "has no index.json and tokens.bin of an artifact `checkfree-ray tokenize` wrote"
        )
    return _parse_index(tokens_uri, entry["size"], entry["sha256"], files["tokens.bin"]["size"])


@functools.lru_cache(maxsize=8)
def _parse_index(tokens_uri: str, index_size: int, index_sha256: str, tokens_size: int) -> dict:
    """The index of `tokens_uri` whose manifest lists this index.json (cached by its sha256, not by the URI)."""
    from rayops.artifacts import read_artifact_file

    index_uri = storage.join(tokens_uri, "index.json")
    listed = {"files": {"index.json": {"size": index_size, "sha256": index_sha256}}}
    try:  # verified against the listed sha256: an index rewritten since the manifest was read is refused
        index = json.loads(read_artifact_file(tokens_uri, "index.json", listed))
        dtype, vocab, total = TOKEN_DTYPES[index["dtype"]], int(index["vocab_size"]), int(index["tokens"])
        splits = {name: (int(a), int(b)) for name, (a, b) in index["splits"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad_tokens(index_uri, f"is malformed ({type(exc).__name__}: {exc})") from None
    if total * np.dtype(dtype).itemsize != tokens_size:
        raise _bad_tokens(
            index_uri, f"lists {total} {index['dtype']} tokens but tokens.bin has {tokens_size} bytes"
        )
    bad = [n for n, (a, b) in splits.items() if not 0 <= a <= b <= total]
    if bad or not {"train", "val"} <= splits.keys() or not 2 <= vocab <= 1 << 32:
        raise _bad_tokens(index_uri, f"has splits {splits} / vocab_size {vocab} outside its {total} tokens")
    return {**index, "splits": splits}


read_index.cache_clear = _parse_index.cache_clear  # type: ignore[attr-defined]  # tests drop the cache


def load_tokenizer(uri: str, field: str = "data.tokenizer"):
    """A `tokenizers.Tokenizer` from a tokenizer.json (local or s3://) and its bytes' sha256."""
    from tokenizers import Tokenizer

    from rayops.artifacts import sha256_hex

    data = storage.read_bytes(uri)
    try:
        return Tokenizer.from_str(data.decode()), sha256_hex(data)
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception for a malformed file)
        raise SpecError(
            f"{uri} is not a tokenizers tokenizer.json ({type(exc).__name__}: {str(exc)[:200]}) "
            f"(`{field}`); train one with `checkfree-ray tokenizer train`"
        ) from None


def tokenizer_size(uri: str) -> int:
    """Vocabulary size of a tokenizers tokenizer.json."""
    return load_tokenizer(uri)[0].get_vocab_size()


def _local_tokens(tokens_uri: str, manifest_entry: dict) -> Path:
    """A local path of the artifact's tokens.bin (an s3:// one is copied once into the cache, named by sha256).

    A cached copy is used only when its size and sha256 match the manifest's; any other is downloaded again
    (a copy cut short, changed on disk, or left by another artifact under the same name)."""
    uri = storage.join(tokens_uri, "tokens.bin")
    if storage.parse_uri(uri).scheme == "file":
        return Path(storage.parse_uri(uri).path)
    cache = Path(os.environ.get(TOKEN_CACHE_ENV) or Path(tempfile.gettempdir()) / "checkfree-tokens")
    local = cache / f"{manifest_entry['sha256']}.bin"
    if local.exists():
        problem = _cached_copy_problem(local, manifest_entry)
        if problem is None:
            return local
        log.warning(
            "cached token file %s %s; downloading %s again (set $%s to move the cache)",
            local,
            problem,
            uri,
            TOKEN_CACHE_ENV,
        )
    storage.download_file(uri, local)
    problem = _cached_copy_problem(local, manifest_entry)
    if problem is not None:
        local.unlink(missing_ok=True)
        raise _bad_tokens(uri, f"was downloaded to {local}, which {problem}")
    return local


def _cached_copy_problem(local: Path, manifest_entry: dict) -> str | None:
    """What is wrong with a local copy of tokens.bin against its manifest entry (None: size and sha256 match)."""
    size = local.stat().st_size
    if size != manifest_entry["size"]:
        return f"has {size} bytes, the manifest lists {manifest_entry['size']}"
    digest = storage.sha256_of(str(local))  # streamed: the file may be larger than memory
    if digest != manifest_entry["sha256"]:
        return f"has sha256 {digest[:12]}..., the manifest lists {manifest_entry['sha256'][:12]}..."
    return None


class TokenCorpus(WindowCorpus):
    """The train and validation ranges of a token artifact, memory-mapped (nanoGPT `.bin`)."""

    def __init__(self, spec: DataSpec, seq_len: int, seed: int):
        from rayops.artifacts import read_manifest

        index = read_index(spec.tokens_uri)
        entry = read_manifest(spec.tokens_uri)["files"]["tokens.bin"]
        path = _local_tokens(spec.tokens_uri, entry)
        if path.stat().st_size != entry["size"]:
            raise _bad_tokens(
                str(path), f"has {path.stat().st_size} bytes, its manifest lists {entry['size']}"
            )
        expected = index["tokenizer"]["sha256"] if isinstance(index["tokenizer"], dict) else None
        if spec.tokenizer is not None and load_tokenizer(spec.tokenizer)[1] != expected:
            raise SpecError(
                f"`data.tokenizer` {spec.tokenizer} is not the tokenizer {spec.tokens_uri} was made with "
                f"({index['tokenizer']}); name that one, or tokenize again with this one"
            )
        tokens = np.memmap(path, dtype=TOKEN_DTYPES[index["dtype"]], mode="r")
        (a, b), (c, d) = index["splits"]["train"], index["splits"]["val"]
        self.vocab_size, self.uri = int(index["vocab_size"]), spec.tokens_uri
        super().__init__(tokens[a:b], tokens[c:d], seq_len, seed, name=f"token file {spec.tokens_uri}")

    def _windows(self, data, starts, shape):
        inputs, targets = super()._windows(data, starts, shape)
        if int(targets.max()) >= self.vocab_size or int(inputs[..., :1].max()) >= self.vocab_size:
            raise _bad_tokens(
                self.uri, f"holds token id {int(targets.max())} >= its vocab_size {self.vocab_size}"
            )
        return inputs, targets


def make_corpus(spec: DataSpec, seq_len: int, seed: int) -> WindowCorpus:
    """The run's corpus: the token artifact `data.tokens_uri`, else the built-in byte-level text."""
    if spec.tokens_uri is not None:
        return TokenCorpus(spec, seq_len, seed)
    return ByteCorpus(spec, seq_len, seed)


def tokenizer_vocab_size(spec: DataSpec) -> int | None:
    """Vocabulary size of the run's token file (its index), or of `data.tokenizer`; None: byte-level, 256."""
    if spec.tokens_uri is not None:
        return int(read_index(spec.tokens_uri)["vocab_size"])
    if spec.tokenizer is not None:
        return tokenizer_size(spec.tokenizer)
    return None


def tokenizer_uri(spec: DataSpec) -> str | None:
    """The run's tokenizer.json: `data.tokenizer`, else the one the token index names (None: byte-level)."""
    if spec.tokenizer is not None or spec.tokens_uri is None:
        return spec.tokenizer
    named = read_index(spec.tokens_uri)["tokenizer"]
    return named.get("uri") if isinstance(named, dict) else None


def data_input_entries(spec: DataSpec) -> dict:
    """Run-identity entries of the token artifact (its manifest's sizes and sha256s) and the tokenizer file."""
    from rayops.artifacts import read_manifest
    from rayops.identity import file_entry

    entries = {}
    if spec.tokens_uri is not None:
        entries["data.tokens_uri"] = {
            "uri": spec.tokens_uri,
            "files": read_manifest(spec.tokens_uri)["files"],
        }
    if spec.tokenizer is not None:
        entries["data.tokenizer"] = file_entry(spec.tokenizer)
    return entries
