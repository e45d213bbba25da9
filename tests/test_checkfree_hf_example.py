"""The "Train your own model" path end to end: text folder -> tokenizer -> tokens -> HF config -> run -> HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from checkfree_ray.cli import main
from checkfree_ray.data import TokenCorpus
from schemas.train import TrainSpec
from schemas.train_result import TrainResult

transformers = pytest.importorskip("transformers")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_hf_llama.yaml"


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_text_folder_to_hf_checkpoint_with_a_stage_killed(ray_local, tmp_path):
    """The example's steps at a small size: the exported model and tokenizer load in transformers/tokenizers
    and give the run's final validation loss on the held-out tokens; the killed stage was rebuilt."""
    from pydoc_data.topics import topics

    texts = tmp_path / "texts"
    texts.mkdir()
    for i, key in enumerate(sorted(topics)[:40]):
        (texts / f"{i:02d}.txt").write_text(topics[key])
    _cli("tokenizer", "train", str(texts), "--out", str(tmp_path / "tok.json"), "--vocab-size", "400")
    _cli("tokenize", str(texts), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "tokens"))
    _cli(
        "hf-config",
        str(tmp_path / "model"),
        "--hidden-size",
        "32",
        "--layers",
        "4",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--tokenizer",
        str(tmp_path / "tok.json"),
    )
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(steps=6, eval_every=3, eval_batches=2)
    raw["model"] = {"hf_path": str(tmp_path / "model"), "seq_len": 32}
    raw["data"] = {"tokens_uri": str(tmp_path / "tokens"), "tokenizer": str(tmp_path / "tok.json")}
    raw["pipeline"].update(micro_batch_size=2, num_cpus_per_stage=0.2, warm_standby=False)
    raw["optim"].update(warmup_steps=2)
    raw["failures"] = {"schedule": [[4, 2]]}
    raw["output"] = {"uri": str(tmp_path / "run")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    _cli("train", str(tmp_path / "spec.yaml"))

    result = TrainResult.model_validate_json((tmp_path / "run" / "result.json").read_text())
    assert [(f.step, f.stage, f.method) for f in result.failures] == [(4, 2, "checkfree")]
    assert result.model_parameters and result.mfu is None and result.tokens_per_s > 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "run" / "hf" / "tokenizer.json")
    )
    assert hf.config.vocab_size == tokenizer.vocab_size <= 400
    spec = TrainSpec.model_validate(raw)
    inputs, targets = TokenCorpus(spec.data, 32, spec.seed).val_batches(2, 2)
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(hf(inputs[m]).logits.flatten(0, 1), targets[m].flatten())
            for m in range(2)
        ]
    assert float(sum(losses) / 2) == pytest.approx(result.final_val_loss, abs=1e-4)
