"""The sizes of one model (`ModelConfig`), from our `LlamaSpec` or from a Hugging Face Llama `config.json`.

`model.py` builds the stages from it and `hf_llama.py` maps Hugging Face weights onto them; both import it from
here. `config_from_hf` turns an HF config into a `ModelConfig` (GQA, RMSNorm eps, rope theta and 'linear'/'llama3'
scaling), refusing what the stages do not implement by field name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from rayops import storage
from schemas.errors import SpecError
from schemas.train import LlamaSpec

VOCAB_SIZE = 256  # byte-level


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of one model; built from `LlamaSpec` (or its `hf_path` config) plus the stage count."""

    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    seq_len: int
    rope_theta: float
    num_stages: int
    vocab_size: int = VOCAB_SIZE
    n_kv_heads: int | None = None  # None: n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: d_model / n_heads
    norm_eps: float = 1e-6
    rope_scaling: tuple[tuple[str, float | str], ...] | None = None  # sorted items of HF `rope_parameters`

    @classmethod
    def from_spec(cls, spec: LlamaSpec, num_stages: int, vocab_size: int | None = None) -> ModelConfig:
        """Resolve defaults: SwiGLU width 8/3 d rounded up to a multiple of 8; `model.hf_path` reads its config."""
        if spec.hf_path is not None:
            return config_from_hf(spec, num_stages, vocab_size)
        hidden = spec.ffn_hidden or 8 * math.ceil(8 * spec.d_model / 3 / 8)
        return cls(
            spec.d_model,
            spec.n_layers,
            spec.n_heads,
            hidden,
            spec.seq_len,
            spec.rope_theta,
            num_stages,
            vocab_size=spec.vocab_size or vocab_size or VOCAB_SIZE,
            n_kv_heads=spec.n_kv_heads,
            norm_eps=spec.norm_eps,
        )

    @classmethod
    def from_train_spec(cls, spec) -> ModelConfig:
        """The model of a `TrainSpec`: its `model` section, with the vocabulary of its tokenizer when it names one."""
        from checkfree_ray.data import tokenizer_vocab_size
        from schemas.errors import SpecError

        data_vocab = tokenizer_vocab_size(spec.data)
        cfg = cls.from_spec(spec.model, spec.pipeline.num_stages, data_vocab)
        if cfg.vocab_size < (data_vocab or VOCAB_SIZE):
            where = f"`model.hf_path` ({spec.model.hf_path})" if spec.model.hf_path else "`model.vocab_size`"
            raise SpecError(
                f"the data's token ids reach {(data_vocab or VOCAB_SIZE) - 1} but {where} has vocab_size "
                f"{cfg.vocab_size}; use a tokenizer within it (`data.tokenizer`) or a larger vocabulary"
            )
        return cfg

    @property
    def layers_per_stage(self) -> int:
        """Blocks in each transformer stage."""
        return self.n_layers // self.num_stages

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention when fewer than `n_heads`)."""
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        """Channels per attention head."""
        return self.head_dim or self.d_model // self.n_heads

    def parameter_count(self) -> int:
        """Parameters of the whole model (embedding, blocks, head), the N of 6·N FLOPs per token."""
        hd, d = self.dim_per_head, self.d_model
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        block = attn + 3 * d * self.ffn_hidden + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * block + d


FIELD = "model.hf_path"
SUPPORTED_ROPE = ("default", "linear", "llama3")
ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
CONFIG_MAX_BYTES = 1_000_000


def read_hf_config(path: str) -> dict:
    """The parsed `config.json` of an HF folder; a missing or malformed one is a `SpecError` naming it."""
    uri = storage.join(path, "config.json")
    data = storage.read_bytes(uri)
    if len(data) > CONFIG_MAX_BYTES:
        raise SpecError(f"{uri} is {len(data)} bytes, not a model config (`{FIELD}`)")
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise SpecError(f"{uri} is not valid JSON ({exc}); fix the file named by `{FIELD}`") from None
    if not isinstance(config, dict):
        raise SpecError(f"{uri} holds no JSON object; fix the file named by `{FIELD}`")
    return config


def rope_parameters(config: Mapping, uri: str) -> dict:
    """HF rope settings as one dict {rope_type, rope_theta, ...}, from transformers 5's `rope_parameters` or
    the older `rope_theta` + `rope_scaling`; a type the stages do not implement is refused by field."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = kind
    params.pop("type", None)
    if kind not in SUPPORTED_ROPE:
        raise SpecError(
            f"{uri}: rope_parameters.rope_type (rope_scaling.rope_type) {kind!r} is not supported by "
            f"the stages; use one of {list(SUPPORTED_ROPE)} (`{FIELD}`)"
        )
    missing = [k for k in ROPE_KEYS.get(kind, ()) if k not in params]
    if missing:
        raise SpecError(f"{uri}: rope type {kind!r} needs rope_parameters.{missing[0]} (`{FIELD}`)")
    return params


def _refuse(config: Mapping, uri: str) -> None:
    """A `SpecError` naming the first field of an HF config that the stages do not implement."""
    checks = [
        ("model_type", config.get("model_type", "llama") == "llama", "must be 'llama'"),
        (
            "tie_word_embeddings",
            not config.get("tie_word_embeddings", False),
            (
                "must be false: the embedding lives on the first stage and the LM head on the last, so they cannot "
                "share one tensor; untie them (save with tie_word_embeddings=false) first"
            ),
        ),
        (
            "attention_bias",
            not config.get("attention_bias", False),
            "must be false (the stages have no biases)",
        ),
        ("mlp_bias", not config.get("mlp_bias", False), "must be false (the stages have no biases)"),
        ("hidden_act", config.get("hidden_act", "silu") == "silu", "must be 'silu' (SwiGLU)"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise SpecError(f"{uri}: {field} = {config.get(field)!r} {why} (`{FIELD}`)")


def config_from_hf(spec: LlamaSpec, num_stages: int, vocab_size: int | None = None) -> ModelConfig:
    """The `ModelConfig` of `spec.hf_path`'s config.json with `spec.seq_len` tokens and `num_stages` stages."""
    uri = storage.join(spec.hf_path, "config.json")
    config = read_hf_config(spec.hf_path)
    _refuse(config, uri)
    try:
        d, layers, heads = (
            int(config["hidden_size"]),
            int(config["num_hidden_layers"]),
            int(config["num_attention_heads"]),
        )
        vocab, hidden = int(config["vocab_size"]), int(config["intermediate_size"])
    except KeyError as exc:
        raise SpecError(f"{uri} has no {exc.args[0]} (`{FIELD}`)") from None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or d // heads)
    if layers % num_stages:
        raise SpecError(
            f"{uri}: num_hidden_layers ({layers}) must be a multiple of `pipeline.num_stages` ({num_stages})"
        )
    if heads % kv or head_dim % 2:
        raise SpecError(
            f"{uri}: num_key_value_heads ({kv}) must divide num_attention_heads ({heads}) and head_dim "
            f"({head_dim}) be even (`{FIELD}`)"
        )
    if vocab_size is not None and vocab_size > vocab:
        raise SpecError(
            f"the tokenizer has {vocab_size} tokens but {uri} has vocab_size {vocab}; use a model with "
            "at least as many, or a smaller tokenizer (`data.tokenizer`)"
        )
    rope = rope_parameters(config, uri)
    theta = float(rope.pop("rope_theta"))
    scaling = tuple(sorted(rope.items())) if rope["rope_type"] != "default" else None
    return ModelConfig(
        d,
        layers,
        heads,
        hidden,
        spec.seq_len,
        theta,
        num_stages,
        vocab_size=vocab,
        n_kv_heads=kv,
        head_dim=head_dim,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_scaling=scaling,
    )
