"""A LLaMa (RMSNorm, rotary embeddings, SwiGLU, causal grouped-query attention), split for a pipeline.

The sizes come from `ModelConfig` (`model_config.py`: our spec, or a Hugging Face Llama config with GQA,
RMSNorm eps, rope theta and scaling); the vocabulary is bytes by default, or a tokenizer's. The model is three
kinds of parts: the embedding (`Embedding`), S transformer stages (`Stage`, each n_layers / S blocks) and the head (`Head`: final norm + LM projection). `build_parts` makes all of them
from one seed, so the pipeline actors and the single-process reference start from identical weights.
`ReferenceTrainer` trains the same parts in one process with the same per-stage clipping and Adam:
the pipeline must match it to float tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkfree_ray.model_config import VOCAB_SIZE, ModelConfig  # noqa: F401 - re-exported


class RMSNorm(nn.Module):
    """x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), scaled as Hugging Face's 'linear' and 'llama3' rope types do."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return freqs / float(scaling["factor"])
    if kind == "llama3":  # Llama 3.1: low frequencies divided by `factor`, a smooth ramp between the bands
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > context / low, freqs / factor, freqs)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled)
    return freqs


def rotary_tables(
    head_dim: int, seq_len: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, head_dim/2)."""
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (B, nh, T, hs) by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2)
    T = x.shape[-2]
    cos, sin = cos[:T], sin[:T]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs/2, 2)
    return out.flatten(-2)


class Attention(nn.Module):
    """Causal grouped-query self-attention (n_kv_heads key/value heads) with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=2)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv, self.hd).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.d_model, cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Embedding(nn.Module):
    """Token ids (B, T) -> activations (B, T, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok(tokens)


class Stage(nn.Module):
    """`layers_per_stage` transformer blocks; the rotary tables are buffers outside the state dict."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers_per_stage))
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        cos, sin = rotary_tables(cfg.dim_per_head, cfg.seq_len, cfg.rope_theta, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return x  # (B, T, d)


class Head(nn.Module):
    """Final RMSNorm and the LM projection to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(self.norm(x))  # (B, T, vocab)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)


@dataclass
class ModelParts:
    """The embedding, the S stages and the head of one model."""

    embedding: Embedding
    stages: list[Stage]
    head: Head


def build_parts(cfg: ModelConfig, seed: int) -> ModelParts:
    """All parts, initialised from `seed` in a fixed order (embedding, stages 0..S-1, head)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        embedding = Embedding(cfg)
        stages = [Stage(cfg) for _ in range(cfg.num_stages)]
        head = Head(cfg)
        for part in (embedding, *stages, head):
            part.apply(_init_weights)
    finally:
        torch.random.set_rng_state(generator_state)
    return ModelParts(embedding, stages, head)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())


def optimizer_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups of `<part>/<name>` parameters: matrices decay by `weight_decay`; norms (vectors) and the
    embedding ('embed/...') never do, the GPT-2/nanoGPT rule."""

    def exempt(name: str, p: nn.Parameter) -> bool:
        return p.ndim < 2 or name.startswith("embed/")

    return [
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
    ]


def stage_named_parameters(parts: ModelParts) -> list[list[tuple[str, nn.Parameter]]]:
    """`<part>/<name>` parameters each stage actor owns, named as the stage actors name them."""
    S = len(parts.stages)
    return [
        [
            (f"{part}/{n}", p)
            for part, module in (
                ("embed", parts.embedding if i == 0 else None),
                ("blocks", parts.stages[i]),
                ("head", parts.head if i == S - 1 else None),
            )
            if module is not None
            for n, p in module.named_parameters()
        ]
        for i in range(S)
    ]


def stage_parameter_groups(parts: ModelParts) -> list[list[nn.Parameter]]:
    """The parameters each stage actor owns: stage 0 also the embedding, the last stage also the head."""
    groups = [list(stage.parameters()) for stage in parts.stages]
    groups[0] = list(parts.embedding.parameters()) + groups[0]
    groups[-1] = groups[-1] + list(parts.head.parameters())
    return groups


class ReferenceTrainer:
    """Single-process training of the same parts: same micro-batches, per-stage clip and Adam."""

    def __init__(
        self, cfg: ModelConfig, seed: int, lr: float, grad_clip: float = 1.0, weight_decay: float = 0.0
    ):
        self.parts = build_parts(cfg, seed)
        self.groups = stage_parameter_groups(self.parts)
        self.grad_clip = grad_clip
        self.lr = lr
        self.optimizers = [
            torch.optim.AdamW(optimizer_groups(named, weight_decay), lr=lr)
            for named in stage_named_parameters(self.parts)
        ]

    def forward_loss(self, tokens: torch.Tensor, targets: torch.Tensor, order: list[int]) -> torch.Tensor:
        """Loss of one micro-batch with the stages applied in `order`."""
        x = self.parts.embedding(tokens)
        for stage_index in order:
            x = self.parts.stages[stage_index](x)
        return lm_loss(self.parts.head(x), targets)

    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, orders: list[list[int]], lr_factor: float = 1.0
    ) -> float:
        """One step over micro-batches (M, B, T) at `lr * lr_factor`; returns the mean loss."""
        M = inputs.shape[0]
        total = 0.0
        for mb in range(M):
            loss = self.forward_loss(inputs[mb], targets[mb], orders[mb])
            (loss / M).backward()
            total += loss.item() / M
        for group, optimizer in zip(self.groups, self.optimizers):
            torch.nn.utils.clip_grad_norm_(group, self.grad_clip)
            for param_group in optimizer.param_groups:
                param_group["lr"] = self.lr * lr_factor
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean loss over micro-batches in the plain order."""
        order = list(range(len(self.parts.stages)))
        return sum(
            self.forward_loss(inputs[m], targets[m], order).item() for m in range(inputs.shape[0])
        ) / len(inputs)
