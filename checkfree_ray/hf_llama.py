"""Hugging Face Llama in and out: our stage modules keep their own code, weights are mapped by name.

`model.hf_path` names a folder (local or s3://) with `config.json` and optionally `*.safetensors` weights
(one `model.safetensors`, or shards listed by `model.safetensors.index.json`). `config_from_hf` (in
`model_config.py`, re-exported here) turns the config into a `ModelConfig`. `hf_to_stage_states` splits HF
weights into the stages' flat states; `stage_states_to_hf` and `export_hf` go back, so that `LlamaForCausalLM.from_pretrained` loads a run.

Rotary layout: our stages rotate interleaved channel pairs (0,1), (2,3)...; Hugging Face rotates the two
halves of each head. The q and k projections are permuted on the way in and out (the permutation of
transformers' convert_llama_weights_to_hf.py), so the two compute the same logits.
No import of transformers happens here: a run needs only torch and safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors.torch import save as save_safetensors

from checkfree_ray.model_config import (  # noqa: F401 - config_from_hf, read_hf_config re-exported
    CONFIG_MAX_BYTES,
    FIELD,
    ModelConfig,
    config_from_hf,
    read_hf_config,
)
from rayops import storage
from rayops.artifacts import write_artifact
from rayops.safetensors_files import load_safetensors
from schemas.errors import CheckpointError, SpecError
from schemas.train import LlamaSpec


def hf_config_dict(cfg: ModelConfig, base: Mapping | None = None) -> dict:
    """An HF `config.json` for `cfg` (keys of `base`, the run's input config, kept where they do not conflict).

    Rotary settings are written for both config generations: `rope_parameters` (transformers 5) and the older
    top-level `rope_theta` plus `rope_scaling` (transformers 4.x, vLLM), which would otherwise fall back to theta
    10000 without a word."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
    out = {
        k: v
        for k, v in (base or {}).items()
        if k not in ("rope_scaling", "rope_theta", "rope_parameters", "torch_dtype", "dtype")
    }
    if rope["rope_type"] != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out.update(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope,
            "rope_theta": cfg.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": "float32",
        }
    )
    out.setdefault("max_position_embeddings", cfg.seq_len)
    return out


# ----- weights -------------------------------------------------------------------------------------------------
def _hf_rotary_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved pairs to HF's rotate-half layout (per head)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _our_rotary_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `_hf_rotary_order`."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


BLOCK_NAMES = {  # our block parameter -> HF layer parameter
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}


def hf_to_stage_states(
    hf: Mapping[str, torch.Tensor], cfg: ModelConfig, uri: str = FIELD
) -> list[dict[str, torch.Tensor]]:
    """Flat model states (`model/<part>/<name>`) of each stage from HF Llama tensors."""

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(
                f"{uri} has no tensor {name!r}; is it a LlamaForCausalLM checkpoint? (`{FIELD}`)"
            )
        return hf[name].float()

    L = cfg.layers_per_stage
    states: list[dict[str, torch.Tensor]] = []
    for stage in range(cfg.num_stages):
        state = {}
        for j in range(L):
            pre, ours = f"model.layers.{stage * L + j}.", f"model/blocks/blocks.{j}."
            q = _our_rotary_order(take(pre + "self_attn.q_proj.weight"), cfg.n_heads)
            k = _our_rotary_order(take(pre + "self_attn.k_proj.weight"), cfg.kv_heads)
            state[ours + "attn.qkv.weight"] = torch.cat(
                [q, k, take(pre + "self_attn.v_proj.weight")]
            ).contiguous()
            for mine, theirs in BLOCK_NAMES.items():
                state[ours + mine] = take(pre + theirs).contiguous()
        states.append(state)
    states[0]["model/embed/tok.weight"] = take("model.embed_tokens.weight").contiguous()
    states[-1]["model/head/norm.weight"] = take("model.norm.weight").contiguous()
    states[-1]["model/head/lm.weight"] = take("lm_head.weight").contiguous()
    return states


def stage_states_to_hf(states: list[Mapping[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors from the stages' flat states (in stage order)."""
    hf: dict[str, torch.Tensor] = {}
    L, hd = cfg.layers_per_stage, cfg.dim_per_head
    for stage, state in enumerate(states):
        for j in range(L):
            pre, ours = f"model.layers.{stage * L + j}.", f"model/blocks/blocks.{j}."
            q, k, v = state[ours + "attn.qkv.weight"].split(
                [cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]
            )
            hf[pre + "self_attn.q_proj.weight"] = _hf_rotary_order(q, cfg.n_heads).contiguous()
            hf[pre + "self_attn.k_proj.weight"] = _hf_rotary_order(k, cfg.kv_heads).contiguous()
            hf[pre + "self_attn.v_proj.weight"] = v.contiguous()
            for mine, theirs in BLOCK_NAMES.items():
                hf[pre + theirs] = state[ours + mine].contiguous()
    hf["model.embed_tokens.weight"] = states[0]["model/embed/tok.weight"].contiguous()
    hf["model.norm.weight"] = states[-1]["model/head/norm.weight"].contiguous()
    hf["lm_head.weight"] = states[-1]["model/head/lm.weight"].contiguous()
    return {k: v.detach().float().cpu().contiguous() for k, v in hf.items()}


def read_hf_weights(path: str) -> dict[str, torch.Tensor] | None:
    """Every tensor of the folder's safetensors weights (sharded or not); None when it holds no weights."""
    index_uri, single_uri = (
        storage.join(path, "model.safetensors.index.json"),
        storage.join(path, "model.safetensors"),
    )
    if storage.exists(index_uri):
        try:
            weight_map = json.loads(storage.read_bytes(index_uri))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{index_uri} is not a safetensors index ({type(exc).__name__}: {exc}); "
                f"fix or remove it (`{FIELD}`)"
            ) from None
    elif storage.exists(single_uri):
        shards = ["model.safetensors"]
    else:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if "/" in shard or shard.startswith("."):
            raise CheckpointError(f"{index_uri} names shard {shard!r} outside its folder (`{FIELD}`)")
        uri = storage.join(path, shard)
        tensors.update(load_safetensors(storage.read_bytes(uri), uri, field=FIELD))
    return tensors


def initial_stage_states(spec: LlamaSpec, cfg: ModelConfig) -> list[dict[str, torch.Tensor]] | None:
    """The stages' starting weights from `spec.hf_path` (None: no hf_path, or a config without weights)."""
    if spec.hf_path is None:
        return None
    hf = read_hf_weights(spec.hf_path)
    return None if hf is None else hf_to_stage_states(hf, cfg, spec.hf_path)


GENERATION_CONFIG = "generation_config.json"  # sampling defaults (eos ids, temperature); copied as it is


def export_hf(
    states: list[Mapping[str, torch.Tensor]],
    cfg: ModelConfig,
    uri: str,
    base_config: Mapping | None = None,
    metadata: Mapping | None = None,
    tokenizer_json: bytes | None = None,
    source_path: str | None = None,
) -> dict:
    """Write `uri` as an HF Llama folder (config.json, model.safetensors, the run's tokenizer.json when it has
    one; manifest last) from the stages' states; `LlamaForCausalLM.from_pretrained(uri)` loads it (local
    folders; copy an s3:// one down first).

    `source_path` is the run's input folder (`model.hf_path`): its generation_config.json is copied when it has
    one, and its config.json is the base when `base_config` is not given."""
    if base_config is None and source_path is not None:
        base_config = read_hf_config(source_path)
    tensors = stage_states_to_hf(states, cfg)
    files = {} if tokenizer_json is None else {"tokenizer.json": tokenizer_json}
    generation = _generation_config(source_path)
    if generation is not None:
        files[GENERATION_CONFIG] = generation
    files |= {
        "model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
        "config.json": json.dumps(hf_config_dict(cfg, base_config), indent=2, sort_keys=True).encode(),
    }
    return write_artifact(uri, files, metadata={"kind": "hf_llama", **dict(metadata or {})})


def _generation_config(source_path: str | None) -> bytes | None:
    """The bytes of `source_path`'s generation_config.json (checked to be a JSON object); None without one."""
    if source_path is None:
        return None
    uri = storage.join(source_path, GENERATION_CONFIG)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        ok = len(data) <= CONFIG_MAX_BYTES and isinstance(json.loads(data), dict)
    except ValueError:
        ok = False
    if not ok:
        raise SpecError(
            f"{uri} is not a generation config (a JSON object under {CONFIG_MAX_BYTES} bytes); fix or "
            f"remove it from the folder named by `{FIELD}`"
        )
    return data


def write_config(uri: str, cfg: ModelConfig) -> str:
    """Write `cfg` as `uri`/config.json (a config without weights: a run initialises it from its seed)."""
    target = storage.join(uri, "config.json")
    storage.write_bytes(target, json.dumps(hf_config_dict(cfg), indent=2, sort_keys=True).encode())
    return target


def model_input_entries(spec: LlamaSpec) -> dict:
    """Run-identity entries of `model.hf_path`: its config and weight files (size and sha256 or ETag)."""
    from rayops.identity import file_entry

    if spec.hf_path is None:
        return {}
    names = ["config.json"]
    index_uri = storage.join(spec.hf_path, "model.safetensors.index.json")
    if storage.exists(index_uri):
        names.append("model.safetensors.index.json")
        names += sorted(set(json.loads(storage.read_bytes(index_uri)).get("weight_map", {}).values()))
    elif storage.exists(storage.join(spec.hf_path, "model.safetensors")):
        names.append("model.safetensors")
    return {f"model.hf_path/{name}": file_entry(storage.join(spec.hf_path, name)) for name in names}
