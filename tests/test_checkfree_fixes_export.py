"""The Hugging Face export is read alike by both config generations and keeps the input's generation config."""

from __future__ import annotations

import json

import pytest
import torch

from checkfree_ray.hf_llama import config_from_hf, export_hf, initial_stage_states, write_config
from checkfree_ray.model import ModelConfig, build_parts
from rayops.artifacts import read_manifest
from schemas.train import LlamaSpec

transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _stage_states(cfg: ModelConfig) -> list[dict[str, torch.Tensor]]:
    from checkfree_ray.stage import initial_stage_state

    parts = build_parts(cfg, seed=3)
    return [initial_stage_state(parts, i) for i in range(cfg.num_stages)]


def test_export_writes_rope_theta_for_both_config_generations(tmp_path):
    """config.json has the trained rope_theta at the top level (4.x, vLLM) and in rope_parameters (5.x)."""
    spec = LlamaSpec(d_model=32, n_layers=2, n_heads=4, seq_len=16, vocab_size=50, rope_theta=500000.0)
    cfg = ModelConfig.from_spec(spec, 2)
    export_hf(_stage_states(cfg), cfg, str(tmp_path / "out"))
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0
    assert raw.get("rope_scaling") is None  # default rotary: 4.x readers expect no scaling
    loaded = transformers.LlamaConfig.from_pretrained(tmp_path / "out")
    assert (
        loaded.rope_parameters["rope_theta"] == 500000.0 and loaded.rope_parameters["rope_type"] == "default"
    )


def test_export_of_scaled_rope_keeps_theta_and_scaling(tmp_path):
    """A llama3-scaled import exports rope_theta and rope_scaling (4.x) beside rope_parameters (5.x), all equal."""
    source = tmp_path / "in"
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_parameters=dict(LLAMA3),
    )
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    spec = LlamaSpec(hf_path=str(source), seq_len=16)
    cfg = config_from_hf(spec, 2)
    base = json.loads((source / "config.json").read_text())
    export_hf(initial_stage_states(spec, cfg), cfg, str(tmp_path / "out"), base_config=base)
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"] == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert raw["rope_parameters"] == LLAMA3
    loaded = transformers.LlamaConfig.from_pretrained(tmp_path / "out")
    assert loaded.rope_parameters == LLAMA3
    assert config_from_hf(LlamaSpec(hf_path=str(tmp_path / "out"), seq_len=16), 2) == cfg


def test_export_copies_the_input_generation_config(tmp_path):
    """The input folder's generation_config.json is in the export, byte for byte and listed in its manifest."""
    source = tmp_path / "in"
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=5,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    generation = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 7], temperature=0.6, top_p=0.9, do_sample=True
    )
    generation.save_pretrained(source)
    spec = LlamaSpec(hf_path=str(source), seq_len=16)
    cfg = config_from_hf(spec, 2)
    out = tmp_path / "out"
    export_hf(initial_stage_states(spec, cfg), cfg, str(out), source_path=str(source))
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert "generation_config.json" in read_manifest(str(out))["files"]
    loaded = transformers.GenerationConfig.from_pretrained(out)
    assert (loaded.eos_token_id, loaded.temperature) == ([2, 7], 0.6)
    assert (
        json.loads((out / "config.json").read_text())["bos_token_id"] == 5
    )  # the source's config is the base


def test_export_without_a_generation_config_writes_none(tmp_path):
    """An input folder without generation_config.json gives an export without one."""
    spec = LlamaSpec(d_model=32, n_layers=2, n_heads=4, seq_len=16, vocab_size=50)
    cfg = ModelConfig.from_spec(spec, 2)
    write_config(str(tmp_path / "in"), cfg)
    export_hf(_stage_states(cfg), cfg, str(tmp_path / "out"), source_path=str(tmp_path / "in"))
    assert not (tmp_path / "out" / "generation_config.json").exists()
