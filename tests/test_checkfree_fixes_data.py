"""Token artifacts: a re-tokenized URI is re-read, hidden folders are skipped, cached S3 copies are verified by
sha256, and the index names its tokenizer by an absolute path."""

from __future__ import annotations

import logging

import numpy as np

from checkfree_ray.data import TOKEN_CACHE_ENV, TokenCorpus, read_index, tokenizer_uri
from checkfree_ray.tokenizing import tokenize, train_tokenizer
from rayops.artifacts import read_manifest
from schemas.train import DataSpec

TEXT = "".join(f"line {i}: stages pass activations forward and gradients back.\n" for i in range(80))


def test_retokenizing_the_same_uri_gives_the_new_splits(tmp_path):
    """Tokenizing other text to a URI already read in this process gives the new token count and splits."""
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT * 3)
    out = str(tmp_path / "tokens")
    tokenize([str(tmp_path / "a.txt")], out, val_fraction=0.1, progress=False)
    assert read_index(out)["tokens"] == len(TEXT) + 2
    second = tokenize([str(tmp_path / "b.txt")], out, val_fraction=0.1, progress=False)
    assert read_index(out)["tokens"] == 3 * len(TEXT) + 2
    corpus = TokenCorpus(DataSpec(tokens_uri=out), seq_len=16, seed=0)
    assert len(corpus.train) == second["splits"]["train"][1]


def test_hidden_files_and_folders_are_not_tokenized(tmp_path):
    """Only visible files are tokenized: `.git/` and `.ipynb_checkpoints/` contents add no tokens."""
    folder = tmp_path / "texts"
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text(TEXT)
    (folder / ".git" / "objects" / "pack.txt").write_text("secret history " * 500)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text(TEXT * 2)
    (folder / ".hidden.txt").write_text("not me\n")
    index = tokenize([str(folder)], str(tmp_path / "tokens"), val_fraction=0.1, progress=False)
    assert index["tokens"] == len(TEXT) + 2  # one document, its bytes plus the blank-line separator


def test_cached_s3_token_file_with_the_wrong_hash_is_downloaded_again(
    tmp_path, moto_bucket, monkeypatch, caplog
):
    """A cached copy of the right size but other bytes is replaced by the artifact's tokens, with a warning."""
    (tmp_path / "a.txt").write_text(TEXT)
    monkeypatch.setenv(TOKEN_CACHE_ENV, str(tmp_path / "cache"))
    out = f"{moto_bucket}/tokens"
    tokenize([str(tmp_path / "a.txt")], out, val_fraction=0.1, progress=False)
    expected = np.frombuffer(TEXT.encode() + b"\n\n", dtype=np.uint8).astype(np.uint16)
    TokenCorpus(DataSpec(tokens_uri=out), seq_len=16, seed=0)
    (cached,) = (tmp_path / "cache").glob("*.bin")
    assert cached.name == read_manifest(out)["files"]["tokens.bin"]["sha256"] + ".bin"
    cached.write_bytes(b"\xff" * cached.stat().st_size)  # same size, other bytes
    with caplog.at_level(logging.WARNING, logger="checkfree_ray.data"):
        corpus = TokenCorpus(DataSpec(tokens_uri=out), seq_len=16, seed=0)
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), expected)
    assert any("sha256" in r.getMessage() and str(cached) in r.getMessage() for r in caplog.records)


def test_index_names_the_tokenizer_by_absolute_path(tmp_path, monkeypatch):
    """A tokenizer given as a relative path is found from another working directory."""
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work" / "a.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path / "work")
    train_tokenizer(["a.txt"], "tok.json", vocab_size=280)
    tokenize(["a.txt"], str(tmp_path / "tokens"), tokenizer_uri="tok.json", val_fraction=0.1, progress=False)
    monkeypatch.chdir(tmp_path / "elsewhere")
    named = tokenizer_uri(DataSpec(tokens_uri=str(tmp_path / "tokens")))
    assert named == str(tmp_path / "work" / "tok.json")
