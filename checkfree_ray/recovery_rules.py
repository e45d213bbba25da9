"""The mathematics and decisions of recovery, as pure functions (no Ray, no state).

Paper: Blagoev et al., "All is Not Lost: LLM Recovery without Checkpoints" (arXiv 2506.15461), Sec. 3
(the weighted average of the neighbours) and Figure 2 (the ablation of rebuild rules).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from schemas.train import RecoverySpec

Source = TypeVar(
    "Source"
)  # a source stage's state: a Ray reference on the engine, a state dict in one process

EMBED, BLOCKS, HEAD = "embed", "blocks", "head"


def plain_order(num_stages: int) -> list[int]:
    """E, S1, ..., Ss, E^-1 (stage indices from 0)."""
    return list(range(num_stages))


def swapped_order(num_stages: int) -> list[int]:
    """CheckFree+ out-of-order pipelining: E, S2, S1, S3, ..., Ss, Ss-1, E^-1 (paper, Sec. CheckFree+).

    The first two stages swap places and so do the last two. With two stages both swaps are the same
    one (S2, S1). Three stages would need stage 2 in two places at once, so they are refused.
    """
    if num_stages == 3:
        raise ValueError("CheckFree+ swaps the outer stage pairs and needs 2 or at least 4 stages, not 3")
    order = plain_order(num_stages)
    order[0], order[1] = order[1], order[0]
    if num_stages >= 4:
        order[-1], order[-2] = order[-2], order[-1]
    return order


def micro_batch_order(strategy: str, num_stages: int, micro_batch: int) -> list[int]:
    """Stage order of one micro-batch: CheckFree+ runs odd micro-batches in the swapped order."""
    if strategy == "checkfree+" and micro_batch % 2 == 1:
        return swapped_order(num_stages)
    return plain_order(num_stages)


def route(order: Sequence[int], num_stages: int) -> list[tuple[int, tuple[str, ...]]]:
    """Hops (stage actor, parts it runs) of one micro-batch.

    The embedding lives on stage 0 and the head on stage S-1; each joins the neighbouring hop when that
    hop is on its own actor, otherwise it is a hop of its own.
    """
    hops: list[tuple[int, list[str]]] = [(stage, [BLOCKS]) for stage in order]
    if hops[0][0] == 0:
        hops[0][1].insert(0, EMBED)
    else:
        hops.insert(0, (0, [EMBED]))
    if hops[-1][0] == num_stages - 1:
        hops[-1][1].append(HEAD)
    else:
        hops.append((num_stages - 1, [HEAD]))
    return [(stage, tuple(parts)) for stage, parts in hops]


def gradient_weights(norm_prev: float, norm_next: float, epsilon: float) -> tuple[float, float]:
    """The two coefficients of the CheckFree average: w_k = (g_k + eps) / sum (paper: eps = 1e-4)."""
    w_prev, w_next = norm_prev + epsilon, norm_next + epsilon
    total = w_prev + w_next
    return w_prev / total, w_next / total


def weighted_sum(
    states: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_k c_k W_k over every tensor of the state dicts, streamed into one preallocated float64 output per tensor.

    The one place where recovery sums weights: the coefficients come from `rule_weights` (the recipe), the
    stage actor that rebuilds itself only calls this.
    """
    if len(states) != len(coefficients) or not states:
        raise ValueError(
            f"{len(states)} states for {len(coefficients)} coefficients; give one coefficient per state"
        )
    keys = list(states[0])
    if any(set(keys) != set(state) for state in states[1:]):
        raise ValueError(
            "neighbour stages have different state-dict keys; they are not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for coefficient, state in zip(coefficients, states):
            acc += coefficient * state[key].to(torch.float64)
        out[key] = acc.to(states[0][key].dtype)
    return out


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], norms: Sequence[float], epsilon: float
) -> dict[str, torch.Tensor]:
    """CheckFree: W_i = (g_{i-1} W_{i-1} + g_{i+1} W_{i+1}) / (g_{i-1} + g_{i+1}), g = grad norm + eps.

    Every tensor of the state dicts is averaged (paper: "all tensors of the stage's state dict").
    """
    if len(states) != 2 or len(norms) != 2:
        raise ValueError("the CheckFree average takes exactly two neighbours")
    return weighted_sum(states, gradient_weights(norms[0], norms[1], epsilon))


RULES = (
    "weighted",
    "average",
    "copy",
    "random",
    "identity",
)  # `recovery.rule`; "exact" is the benchmark's bound
FRESH_RULES = ("random", "identity")  # rules that sum nothing: the blocks are built afresh


def rule_weights(rule: str, norms: Sequence[float], epsilon: float) -> tuple[float, float] | None:
    """Coefficients of the (previous, next) neighbours with which a middle-stage `rule` rebuilds a stage.

    The paper's ablation (Figure 2) compares, best to worst: "weighted" (CheckFree: gradient norms + eps,
    the paper's Sec. 3), "average" (equal weights), "copy" (the previous neighbour: 1 and 0) and
    "random" (a freshly initialised stage; None, as nothing is summed). "identity" is a control: the stage
    becomes a skip (`reinitialised_blocks`); None as well.
    """
    if rule == "weighted":
        return gradient_weights(float(norms[0]), float(norms[1]), epsilon)
    if rule == "average":
        return 0.5, 0.5
    if rule == "copy":
        return 1.0, 0.0
    if rule in FRESH_RULES:
        return None
    if rule == "exact":
        raise ValueError(
            "rule 'exact' (a same-step copy of the lost stage) exists only in the recovery ablation "
            "benchmark; a run that needs exact recovery uses `recovery.strategy` 'redundant'"
        )
    raise ValueError(
        f"unknown recovery rule {rule!r}; use 'weighted', 'average', 'copy', 'random' or 'identity'"
    )


def weighing_norm(norms: Mapping[str, float], scope: str = "stage", grad_norm: str = "post_clip") -> float:
    """The gradient L2 norm of a stage's last committed step that weighs it in a CheckFree average.

    `norms` is what the stage's optimizer step reported: `stage`/`blocks` after clipping and
    `stage_pre_clip`/`blocks_pre_clip` before. The paper's authors use the norm after clipping at 1.0;
    "stage" covers exactly the parameters the stage clips (its embedding or head included).
    """
    key = scope if grad_norm == "post_clip" else f"{scope}_pre_clip"
    return float(norms.get(key, 0.0))


def weighing_norms(recovery: RecoverySpec, grad_norms: Sequence[Mapping[str, float]]) -> list[float]:
    """Every stage's weighing norm (`weighing_norm`) under the run's `recovery.grad_norm_scope` and `grad_norm`."""
    return [weighing_norm(n, recovery.grad_norm_scope, recovery.grad_norm) for n in grad_norms]


def at_clip(norms: Mapping[str, float], grad_clip: float) -> bool:
    """Whether the stage's gradient was clipped: then its post-clip norm equals the clip, and two such
    neighbours weigh equally (the weighted rule is the plain average)."""
    return float(norms.get("stage_pre_clip", 0.0)) >= grad_clip


def reinitialised_blocks(cfg, stage_index: int, seed: int, rule: str = "random") -> dict[str, torch.Tensor]:
    """Stage `stage_index`'s blocks built afresh from `seed`, as flat `model/blocks/...` state.

    "random": the model's own initialisation (std 0.02), not the run's initial weights. "identity": the same,
    with every block's output projections (`attn.proj`, `ffn.w2`) zeroed. A pre-norm block computes
    x + proj(attn(norm(x))) then x + w2(...); with both projections zero (no biases) it returns x bit for bit, so
    the stage is an exact skip, yet it keeps its shape and trains: the projections get gradients at once, the
    rest from the next step on (the zero-initialised residual branch of ReZero / Fixup).
    """
    from checkfree_ray.model import build_parts

    if rule not in FRESH_RULES:
        raise ValueError(f"rule {rule!r} sums neighbours; only {FRESH_RULES} build blocks afresh")
    stage = build_parts(cfg, seed).stages[stage_index]
    blocks = {
        f"model/{BLOCKS}/{name}": tensor.detach().clone() for name, tensor in stage.state_dict().items()
    }
    if rule == "identity":
        for key, tensor in blocks.items():
            if key.endswith((".attn.proj.weight", ".ffn.w2.weight")):
                tensor.zero_()
    return blocks


def reinit_seed(run_seed: int, step: int, stage_index: int) -> int:
    """Seed of a "random"-rule re-initialisation: differs from the run's seed, by step and stage."""
    return run_seed * 1_000_003 + 7919 * step + stage_index + 1


def recovered_lr(base_lr: float, lr_scale: float) -> float:
    """A rebuilt stage's learning rate: base × lr_scale (paper: 1.1). Set, never multiplied again."""
    return base_lr * lr_scale


def failure_probability(hourly_rate: float, step_time_s: float) -> float:
    """Per-step failure probability from an hourly rate: p = 1 - (1 - h)^(t_iter / 3600) (paper)."""
    return 1.0 - (1.0 - hourly_rate) ** (step_time_s / 3600.0)


@dataclass(frozen=True)
class StageRecovery:
    """How one lost stage is rebuilt: `method` and the stages whose state it needs."""

    stage: int
    method: (
        str  # "checkfree" (middle-stage rule), "copy" (CheckFree+ swap partner), "redundant" (backup copy)
    )
    sources: tuple[int, ...]
    weights: tuple[float, ...] = ()  # checkfree: the coefficient of each source's blocks; () for "random"
    rule: str = ""  # checkfree: the `recovery.rule` (a "random" or "identity" rebuild has no sources)


@dataclass(frozen=True)
class RecoveryPlan:
    """Either per-stage rebuilds, or a rollback of the whole model to the last checkpoint."""

    rebuilds: list[StageRecovery] = field(default_factory=list)
    rollback: bool = False
    reason: str = ""


def _rebuild(
    strategy: str, stage: int, num_stages: int, rule: str, norms: Sequence[float] | None, epsilon: float
) -> StageRecovery | None:
    last = num_stages - 1
    if strategy == "redundant":
        return StageRecovery(stage, "redundant", ((stage - 1) % num_stages,))
    if strategy in ("checkfree", "checkfree+") and 0 < stage < last:
        neighbours = (stage - 1, stage + 1)
        weights = rule_weights(rule, [norms[s] if norms else 0.0 for s in neighbours], epsilon)
        if weights is None:  # "random", "identity": nothing to sum
            return StageRecovery(stage, "checkfree", (), rule=rule)
        kept = [
            (s, w) for s, w in zip(neighbours, weights) if w != 0.0
        ]  # "copy" never fetches the other side
        return StageRecovery(stage, "checkfree", tuple(s for s, _ in kept), tuple(w for _, w in kept), rule)
    if strategy == "checkfree+":
        partner = 1 if stage == 0 else last - 1  # the swap partner also holds the (de)embedding copy
        return StageRecovery(stage, "copy", (partner,))
    return None


def plan_recovery(
    strategy: str,
    lost: set[int],
    num_stages: int,
    rule: str = "weighted",
    norms: Sequence[float] | None = None,
    epsilon: float = 1e-4,
) -> RecoveryPlan:
    """Decide how to recover the `lost` stages: the recipe of each rebuild (source stages and their weights,
    from `rule` and each stage's weighing `norms`), or `rollback` when some stage cannot be rebuilt from live
    ones. Two adjacent middle stages are a rollback even under the "copy" rule, which needs one of them."""
    if strategy == "none":
        raise ValueError("strategy 'none' has no recovery; the caller reports the failure")
    if strategy == "checkpoint":
        return RecoveryPlan(rollback=True, reason="the checkpoint strategy rolls every stage back")
    rebuilds = []
    for stage in sorted(lost):
        rebuild = _rebuild(strategy, stage, num_stages, rule, norms, epsilon)
        if rebuild is None:
            return RecoveryPlan(rollback=True, reason=f"{strategy} cannot rebuild outer stage {stage}")
        needed = (stage - 1, stage + 1) if rebuild.method == "checkfree" else rebuild.sources
        dead_sources = [s for s in needed if s in lost]
        if dead_sources:
            return RecoveryPlan(
                rollback=True,
                reason=f"stage {stage} and its source stage(s) {dead_sources} were lost together",
            )
        rebuilds.append(rebuild)
    return RecoveryPlan(rebuilds=rebuilds)


def plan_for(
    recovery: RecoverySpec,
    strategy: str,
    lost: set[int] | Sequence[int],
    num_stages: int,
    grad_norms: Sequence[Mapping[str, float]],
) -> RecoveryPlan:
    """`plan_recovery` with the run's `recovery` settings (rule, epsilon, weighing norms) and each stage's last
    reported gradient norms: the plan the engine carries out when the `lost` stages go."""
    norms = weighing_norms(recovery, grad_norms)
    return plan_recovery(strategy, set(lost), num_stages, recovery.rule, norms, recovery.epsilon)


@dataclass(frozen=True)
class StageSources(Generic[Source]):
    """What a replacement stage is configured with (`StageWorker.configure(stage, lr, *sources, weights=...)`)."""

    lr: float | None  # None: the source's own learning rate (a redundant backup restores Adam and lr exactly)
    sources: list[Source | dict[str, torch.Tensor]]
    weights: tuple[float, ...] = ()  # coefficients of the first len(weights) sources' blocks (CheckFree)


def rebuild_sources(
    rebuild: StageRecovery,
    lr: float,
    cfg,
    run_seed: int,
    step: int,
    blocks_of: Callable[[int], Source],
    copy_of: Callable[[int], Source],
    backup_of: Callable[[int], Source],
) -> StageSources[Source]:
    """The sources and weights of one `rebuild` of a plan at `step`: blocks built afresh ("random", "identity"),
    the neighbours' blocks and the recipe's weights (CheckFree), the swap partner's blocks and the (de)embedding
    copy it holds (CheckFree+), or the predecessor's exact backup (redundant). The callbacks fetch a source stage's
    blocks, copy and backup by its index; the replacement only sums."""
    stage, sources = rebuild.stage, rebuild.sources
    if rebuild.method == "checkfree" and not sources:
        blocks = reinitialised_blocks(cfg, stage, reinit_seed(run_seed, step, stage), rebuild.rule)
        return StageSources(lr, [blocks])
    if rebuild.method == "checkfree":
        return StageSources(lr, [blocks_of(s) for s in sources], rebuild.weights)
    if rebuild.method == "copy":
        return StageSources(lr, [blocks_of(sources[0]), copy_of(sources[0])])
    return StageSources(None, [backup_of(sources[0])])
