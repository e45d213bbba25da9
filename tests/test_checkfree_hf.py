"""Hugging Face Llama in and out: our stages compute transformers' logits, and an export loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from checkfree_ray.hf_llama import config_from_hf, export_hf, hf_to_stage_states, initial_stage_states
from checkfree_ray.model import build_parts
from schemas.errors import SpecError
from schemas.train import LlamaSpec

transformers = pytest.importorskip("transformers")

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def tiny_hf_model(rope: str = "llama3", seed: int = 0, **overrides):
    """A random LlamaForCausalLM with GQA (4 heads, 2 kv heads), 4 layers, a 97-token vocabulary."""
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_parameters": ROPES[rope],
    }
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # norms away from 1, so that a norm mapped to the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def pipeline_logits(states, cfg, tokens):
    """Logits of the stages built from flat states, applied in order."""
    parts = build_parts(cfg, seed=123)
    for i, state in enumerate(states):
        modules = {"blocks": parts.stages[i], "embed": parts.embedding, "head": parts.head}
        for part, module in modules.items():
            sub = {k.split("/", 2)[2]: v for k, v in state.items() if k.startswith(f"model/{part}/")}
            if sub:
                module.load_state_dict(sub, strict=True)
    with torch.no_grad():
        x = parts.embedding(tokens)
        for stage in parts.stages:
            x = stage(x)
        return parts.head(x)


@pytest.mark.parametrize("rope", ["default", "linear", "llama3"])
def test_save_pretrained_folder_gives_transformers_logits(tmp_path, rope):
    """A save_pretrained folder loaded into 2 stages gives transformers' logits to 1e-4 (GQA, eps, rope)."""
    model = tiny_hf_model(rope)
    model.save_pretrained(tmp_path / "hf")
    spec = LlamaSpec(hf_path=str(tmp_path / "hf"), seq_len=24)
    cfg = config_from_hf(spec, num_stages=2)
    assert (cfg.kv_heads, cfg.vocab_size, cfg.norm_eps) == (2, 97, 1e-5)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    ours = pipeline_logits(initial_stage_states(spec, cfg), cfg, tokens)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_sharded_folder_loads_the_same_weights(tmp_path):
    """A folder sharded with model.safetensors.index.json loads to the same stage states as one file."""
    model = tiny_hf_model()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    spec_one = LlamaSpec(hf_path=str(tmp_path / "one"), seq_len=16)
    spec_sharded = LlamaSpec(hf_path=str(tmp_path / "sharded"), seq_len=16)
    cfg = config_from_hf(spec_one, 4)
    one, sharded = initial_stage_states(spec_one, cfg), initial_stage_states(spec_sharded, cfg)
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(one, sharded))


def test_export_loads_in_transformers_with_pipeline_logits(tmp_path):
    """An exported folder loads with LlamaForCausalLM.from_pretrained and gives the pipeline's logits to 1e-4."""
    spec = LlamaSpec(
        d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=16, vocab_size=50, norm_eps=1e-5
    )
    from checkfree_ray.model import ModelConfig
    from checkfree_ray.stage import initial_stage_state

    cfg = ModelConfig.from_spec(spec, 2)
    parts = build_parts(cfg, seed=3)
    with torch.no_grad():
        parts.stages[1].blocks[0].ffn_norm.weight.uniform_(0.5, 1.5)
    states = [initial_stage_state(parts, i) for i in range(2)]
    export_hf(states, cfg, str(tmp_path / "out"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = loaded(tokens).logits
    ours = pipeline_logits(states, cfg, tokens)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert loaded.config.num_key_value_heads == 2


def test_round_trip_through_hf_names_is_exact(tmp_path):
    """Import of an export returns every stage tensor bit for bit (the rotary permutation is its own inverse)."""
    model = tiny_hf_model("linear")
    model.save_pretrained(tmp_path / "in")
    spec = LlamaSpec(hf_path=str(tmp_path / "in"), seq_len=16)
    cfg = config_from_hf(spec, 2)
    states = initial_stage_states(spec, cfg)
    export_hf(
        states, cfg, str(tmp_path / "out"), base_config=json.loads((tmp_path / "in/config.json").read_text())
    )
    again = initial_stage_states(LlamaSpec(hf_path=str(tmp_path / "out"), seq_len=16), cfg)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states, again) for k in a)
    assert config_from_hf(LlamaSpec(hf_path=str(tmp_path / "out"), seq_len=16), 2) == cfg


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "'yarn'"),
        ("num_hidden_layers", 3, "num_hidden_layers (3)"),
    ],
)
def test_unsupported_configs_are_refused_by_field(tmp_path, field, value, words):
    """Tied embeddings, an unsupported rope type and layers not splitting over the stages name the field."""
    config = tiny_hf_model().config.to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="config.json") as info:
        config_from_hf(LlamaSpec(hf_path=str(tmp_path), seq_len=16), 2)
    assert words in str(info.value)


def test_missing_tensor_is_named(tmp_path):
    """A checkpoint without a layer's tensor is refused naming the tensor."""
    model = tiny_hf_model()
    model.save_pretrained(tmp_path)
    cfg = config_from_hf(LlamaSpec(hf_path=str(tmp_path), seq_len=16), 2)
    hf = dict(model.state_dict())
    del hf["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(Exception, match="model.layers.3.mlp.up_proj.weight"):
        hf_to_stage_states(hf, cfg, str(tmp_path))


def _upload_folder(local, uri):
    from rayops import storage

    for path in sorted(local.iterdir()):
        storage.write_bytes(storage.join(uri, path.name), path.read_bytes())


@pytest.mark.timeout(240)
def test_run_from_s3_hf_folder_exports_what_transformers_loads(ray_local, moto_bucket, tmp_path):
    """A run from an s3:// HF folder starts from its weights (lr ~ 0) and exports output/hf/ that
    transformers loads with the input model's logits."""
    from checkfree_ray import run_training
    from schemas.train import TrainSpec

    model = tiny_hf_model("llama3", vocab_size=256)
    model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    _upload_folder(tmp_path / "hf", f"{moto_bucket}/base")
    spec = TrainSpec.model_validate(
        {
            "steps": 2,
            "eval_every": 2,
            "eval_batches": 1,
            "model": {"hf_path": f"{moto_bucket}/base", "seq_len": 16},
            "pipeline": {
                "num_stages": 2,
                "micro_batches": 2,
                "micro_batch_size": 2,
                "num_cpus_per_stage": 0.2,
                "warm_standby": False,
            },
            "optim": {"lr": 1e-9},
            "recovery": {"strategy": "checkfree+"},
            "output": {"uri": str(tmp_path / "run")},
        }
    )
    result = run_training(spec, progress=False)
    assert result.files["hf"] == str(tmp_path / "run" / "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before, after = model(tokens).logits, loaded(tokens).logits
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()


def test_byte_data_into_a_smaller_vocabulary_is_refused(tmp_path):
    """Byte-level data (ids up to 255) for a 97-token model is refused naming the vocabulary fields."""
    from checkfree_ray.model import ModelConfig
    from schemas.train import TrainSpec

    tiny_hf_model().save_pretrained(tmp_path)
    spec = TrainSpec.model_validate(
        {"model": {"hf_path": str(tmp_path), "seq_len": 16}, "pipeline": {"num_stages": 2}}
    )
    with pytest.raises(SpecError, match="vocab_size"):
        ModelConfig.from_train_spec(spec)


def test_run_identity_covers_the_model_and_token_files(tmp_path):
    """Rewriting config.json/weights or the token file under the same paths changes the run fingerprint."""
    from checkfree_ray.run_identity import new_identity
    from checkfree_ray.tokenizing import tokenize
    from schemas.train import TrainSpec

    tiny_hf_model(vocab_size=256).save_pretrained(tmp_path / "hf")
    (tmp_path / "a.txt").write_text("some text to tokenize " * 50)
    tokenize([str(tmp_path / "a.txt")], str(tmp_path / "tokens"), progress=False)
    spec = TrainSpec.model_validate(
        {
            "model": {"hf_path": str(tmp_path / "hf"), "seq_len": 16},
            "data": {"tokens_uri": str(tmp_path / "tokens")},
            "pipeline": {"num_stages": 2},
        }
    )
    first = new_identity(spec)
    assert "model.hf_path/model.safetensors" in first.inputs and "data.tokens_uri" in first.inputs
    tiny_hf_model(vocab_size=256, seed=1).save_pretrained(tmp_path / "hf")
    second = new_identity(spec)
    assert second.fingerprint != first.fingerprint
    (tmp_path / "a.txt").write_text("other text to tokenize " * 50)
    tokenize([str(tmp_path / "a.txt")], str(tmp_path / "tokens"), progress=False)
    assert new_identity(spec).fingerprint != second.fingerprint
