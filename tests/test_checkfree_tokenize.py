"""Tokenizer training, tokenizing text/jsonl/parquet (local and s3://) and the token-file loader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from checkfree_ray.cli import main
from checkfree_ray.data import DATA_STREAM, TokenCorpus, read_index, step_rng, tokenizer_vocab_size
from checkfree_ray.tokenizing import tokenize, train_tokenizer
from rayops import storage
from rayops.artifacts import write_artifact
from schemas.errors import SpecError
from schemas.train import DataSpec

DOCS = [
    f"Document {i}: the pipeline stage {i % 4} trains on tokens, and the quick brown fox jumps {i} times."
    for i in range(60)
]


@pytest.fixture
def corpus(tmp_path):
    """A folder with two text files, and the same documents as jsonl and parquet."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(DOCS[:30]) + "\n")
    (folder / "b.txt").write_text("\n".join(DOCS[30:]) + "\n")
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    )
    pq.write_table(pa.table({"content": DOCS}), tmp_path / "docs.parquet", row_group_size=7)
    return tmp_path


def test_cli_trains_a_bpe_tokenizer_on_a_folder(corpus):
    """`checkfree-ray tokenizer train` writes a tokenizer.json that round-trips the text and merges words."""
    out = corpus / "tok.json"
    res = CliRunner().invoke(
        main, ["tokenizer", "train", str(corpus / "texts"), "--out", str(out), "--vocab-size", "300"]
    )
    assert res.exit_code == 0, res.output
    tok = Tokenizer.from_file(str(out))
    assert 260 < tok.get_vocab_size() <= 300 and tok.token_to_id("<|endoftext|>") == 0
    ids = tok.encode(DOCS[5]).ids
    assert tok.decode(ids) == DOCS[5] and len(ids) < len(DOCS[5].encode()) / 2


@pytest.mark.parametrize("source, fmt_field", [("docs.jsonl", "body"), ("docs.parquet", "content")])
def test_jsonl_and_parquet_on_s3_give_the_tokenizers_ids(corpus, moto_bucket, source, fmt_field):
    """Rows of jsonl (field) and parquet (column) on s3:// become the tokenizer's ids plus end-of-text each."""
    train_tokenizer([str(corpus / "texts")], str(corpus / "tok.json"), vocab_size=300)
    storage.write_bytes(f"{moto_bucket}/in/{source}", (corpus / source).read_bytes())
    out = f"{moto_bucket}/tokens"
    index = tokenize(
        [f"{moto_bucket}/in/{source}"],
        out,
        tokenizer_uri=str(corpus / "tok.json"),
        val_fraction=0.1,
        field=fmt_field,
        progress=False,
    )
    tok = Tokenizer.from_file(str(corpus / "tok.json"))
    expected = np.array([i for d in DOCS for i in [*tok.encode(d).ids, 0]], dtype=np.uint16)
    got = np.frombuffer(storage.read_bytes(f"{out}/tokens.bin"), dtype=np.uint16)
    assert np.array_equal(got, expected)
    n_val = round(len(expected) * 0.1)
    assert index["splits"] == {
        "train": [0, len(expected) - n_val],
        "val": [len(expected) - n_val, len(expected)],
    }
    assert read_index(out)["dtype"] == "uint16" and tokenizer_vocab_size(DataSpec(tokens_uri=out)) == 300


def test_cli_byte_level_with_separate_validation_files(corpus):
    """Without a tokenizer the tokens are the UTF-8 bytes; --val files fill the validation range after training."""
    (corpus / "val.txt").write_text("held out text\n")
    out = corpus / "bytes"
    res = CliRunner().invoke(
        main,
        ["tokenize", str(corpus / "texts" / "a.txt"), "--val", str(corpus / "val.txt"), "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    tokens = np.fromfile(out / "tokens.bin", dtype=np.uint16)
    train_bytes = (corpus / "texts" / "a.txt").read_bytes() + b"\n\n"
    assert (
        tokens.tobytes()
        == np.frombuffer(train_bytes + b"held out text\n\n\n", np.uint8).astype(np.uint16).tobytes()
    )
    index = read_index(str(out))
    assert index["splits"]["val"] == (len(train_bytes), len(tokens)) and index["vocab_size"] == 256


def test_loader_batches_are_a_pure_function_of_seed_and_step(corpus):
    """Two loaders give equal batches per step, equal to windows drawn independently from the file."""
    out = str(corpus / "tokens")
    tokenize([str(corpus / "texts")], out, val_fraction=0.2, progress=False)
    spec = DataSpec(tokens_uri=out)
    a, b = TokenCorpus(spec, 16, seed=5), TokenCorpus(spec, 16, seed=5)
    x1, y1 = a.train_batch(7, 2, 3)
    assert all(np.array_equal(u, v) for u, v in zip((x1, y1), b.train_batch(7, 2, 3)))
    assert not np.array_equal(x1, a.train_batch(8, 2, 3)[0])
    tokens = np.fromfile(corpus / "tokens" / "tokens.bin", dtype=np.uint16).astype(np.int64)
    n_train = read_index(out)["splits"]["train"][1]
    starts = step_rng(5, DATA_STREAM, 7).integers(0, n_train - 17, size=6)
    windows = np.stack([tokens[s : s + 17] for s in starts]).reshape(2, 3, 17)
    assert np.array_equal(x1.numpy(), windows[..., :-1]) and np.array_equal(y1.numpy(), windows[..., 1:])
    assert x1.max() < 256


def _rewrite(folder, tokens: np.ndarray | None = None, index: dict | None = None):
    """Rewrite a token artifact (consistent manifest) with changed tokens or index."""
    files = {
        "tokens.bin": (
            tokens if tokens is not None else np.fromfile(folder / "tokens.bin", np.uint16)
        ).tobytes(),
        "index.json": json.dumps(index or json.loads((folder / "index.json").read_text())).encode(),
    }
    write_artifact(str(folder), files, metadata={"kind": "tokens"})
    read_index.cache_clear()


def test_bad_token_files_are_named(corpus):
    """An index listing more tokens than the file holds, a malformed index and ids beyond the vocabulary are
    refused naming the file."""
    out = corpus / "tokens"
    tokenize([str(corpus / "texts")], str(out), progress=False)
    good = json.loads((out / "index.json").read_text())
    _rewrite(out, index={**good, "tokens": good["tokens"] + 10})
    with pytest.raises(SpecError, match=r"index.json lists .* tokens but tokens.bin has"):
        TokenCorpus(DataSpec(tokens_uri=str(out)), 16, 0)
    _rewrite(out, index={**good, "splits": {"train": [0, 5]}})
    with pytest.raises(SpecError, match="index.json"):
        TokenCorpus(DataSpec(tokens_uri=str(out)), 16, 0)
    _rewrite(out, tokens=np.full(good["tokens"], 300, dtype=np.uint16), index=good)
    with pytest.raises(SpecError, match="token id 300 >= its vocab_size 256"):
        TokenCorpus(DataSpec(tokens_uri=str(out)), 16, 0).train_batch(1, 1, 1)
    (out / "tokens.bin").write_bytes(b"\0" * 10)  # changed after the artifact was written
    read_index.cache_clear()
    with pytest.raises(SpecError, match="tokens.bin"):
        TokenCorpus(DataSpec(tokens_uri=str(out)), 16, 0)


def test_wrong_tokenizer_for_the_tokens_is_refused(corpus):
    """`data.tokenizer` other than the one the tokens were made with is refused naming both."""
    train_tokenizer([str(corpus / "texts")], str(corpus / "t1.json"), vocab_size=300)
    train_tokenizer([str(corpus / "texts")], str(corpus / "t2.json"), vocab_size=280)
    tokenize(
        [str(corpus / "texts")], str(corpus / "tok"), tokenizer_uri=str(corpus / "t1.json"), progress=False
    )
    with pytest.raises(SpecError, match="t2.json is not the tokenizer"):
        TokenCorpus(DataSpec(tokens_uri=str(corpus / "tok"), tokenizer=str(corpus / "t2.json")), 8, 0)
