"""The CheckFree engine's stages driven in one process, for the recovery ablation (many short runs).

The ablation is about the quality of a rebuilt stage, not the transport, so the stages here are the engine's own
`StageWorker` objects (the class the Ray actors run: same model, AdamW groups, per-stage clipping and reported
gradient norms) called directly in GPipe order, with the micro-batch routes of `recovery_rules.route`
(CheckFree+'s swap included). A lost stage is rebuilt by the engine's own recovery code: the plan of
`recovery_rules.plan_for` and the sources and weights of `recovery_rules.rebuild_sources`, the calls
`checkfree_ray/stage_recovery.py` makes for its replacement actors; the stage only sums (`StageWorker.configure`).

The trained model is the engine's own checkpoint (`CheckpointStore`, run identity from `open_run`) under
`outputs/bench-cache/recovery/<fingerprint>/`: a spec that changes gets another folder and retrains; an
interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from checkfree_ray.checkpoint_store import CheckpointStore
from checkfree_ray.data import make_corpus
from checkfree_ray.history import History, restore_history, save_history
from checkfree_ray.lr_schedule import lr_factor
from checkfree_ray.model import ModelConfig
from checkfree_ray.recovery_rules import (
    BLOCKS,
    EMBED,
    HEAD,
    micro_batch_order,
    plain_order,
    plan_for,
    rebuild_sources,
    recovered_lr,
    route,
    weighing_norms,
)
from checkfree_ray.run_identity import open_run, spec_inputs
from checkfree_ray.stage import StageWorker, initial_states
from rayops.identity import digest
from schemas.train import TrainSpec

CACHE = Path(__file__).resolve().parents[1] / "outputs" / "bench-cache" / "recovery"
Snapshot = tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]


class LocalStage(StageWorker):
    """A `StageWorker` outside Ray: only its identity call differs (no runtime context to ask)."""

    def ping(self) -> dict:
        """Process id and assigned stage."""
        return {"pid": os.getpid(), "stage": self.stage_index}


class LocalPipeline:
    """S stage workers of one spec, stepped in GPipe order in this process."""

    def __init__(self, spec: TrainSpec):
        self.spec, self.S = spec, spec.pipeline.num_stages
        self.cfg = ModelConfig.from_train_spec(spec)
        opt = spec.optim
        self.workers = [LocalStage(self.cfg, opt.grad_clip, opt.weight_decay) for _ in range(self.S)]
        for i, state in enumerate(initial_states(spec, self.cfg)):
            self.workers[i].configure(i, opt.lr, state)
        self.grad_norms: list[dict[str, float]] = [{"blocks": 0.0, "stage": 0.0} for _ in range(self.S)]

    def train_step(self, step: int, corpus) -> float:
        """One step on `corpus`'s batch of `step` (every forward, then every backward, then each stage's clip and
        AdamW step, as the executor submits them); returns the mean training loss."""
        pipe = self.spec.pipeline
        inputs, targets = corpus.train_batch(step, pipe.micro_batches, pipe.micro_batch_size)
        M = inputs.shape[0]
        routes, losses = [], []
        for mb in range(M):
            hops = route(micro_batch_order(self.spec.recovery.strategy, self.S, mb), self.S)
            x = inputs[mb]
            for hop, (stage, parts) in enumerate(hops):
                last = hop == len(hops) - 1
                x = self.workers[stage].forward(
                    mb, hop, parts, x, targets[mb] if last else None, 1.0 / M, True
                )
            losses.append(x)
            routes.append(hops)
        for mb, hops in enumerate(routes):
            grad = None
            for hop in reversed(range(len(hops))):
                grad = self.workers[hops[hop][0]].backward(mb, hop, grad)
        factor = lr_factor(self.spec, step)
        self.grad_norms = [w.step(clip="per_stage", lr_factor=factor) for w in self.workers]
        return sum(losses) / M

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Mean validation loss over micro-batches (M, B, T) in the plain order."""
        hops = route(plain_order(self.S), self.S)
        total = 0.0
        for mb in range(inputs.shape[0]):
            x = inputs[mb]
            for hop, (stage, parts) in enumerate(hops):
                last = hop == len(hops) - 1
                x = self.workers[stage].forward(mb, hop, parts, x, targets[mb] if last else None, 1.0, False)
            total += x
        return total / inputs.shape[0]

    def snapshot(self) -> Snapshot:
        """Every stage's full state (weights, Adam, lr) and the last step's gradient norms."""
        return [w.get_state(include_optim=True) for w in self.workers], [dict(n) for n in self.grad_norms]

    def restore(self, snapshot: Snapshot) -> None:
        """Back to a `snapshot` exactly (each stage configured from its own state, Adam included)."""
        states, norms = snapshot
        for i, (worker, state) in enumerate(zip(self.workers, states)):
            worker.configure(i, None, state)
        self.grad_norms = [dict(n) for n in norms]

    def rebuild(self, stage: int, rule: str, step: int, run_seed: int) -> dict:
        """Lose `stage` after step `step - 1` and rebuild it by `rule` through the engine's own recovery code
        (`recovery_rules.plan_for` and `rebuild_sources`, what `StageRecovery` sends its replacement actor), or by
        'exact' (its own same-step weights, the upper bound that only this benchmark can take). The rebuilt stage
        gets a fresh AdamW at lr x `recovery.lr_scale`, as every CheckFree rebuild does. A CheckFree+ outer stage's
        (de)embedding copy is its own (de)embedding: the copy of a run that copies every step."""
        rec = self.spec.recovery
        lr = recovered_lr(self.spec.optim.lr, rec.lr_scale)
        lost = self.workers[stage]
        if rule == "exact":
            self.workers[stage] = self._fresh(stage, lr, lost.get_state())
            return {"method": "exact", "sources": [stage], "weights": [1.0]}
        plan = plan_for(rec.model_copy(update={"rule": rule}), rec.strategy, {stage}, self.S, self.grad_norms)
        (recipe,) = plan.rebuilds
        src = rebuild_sources(
            recipe,
            lr,
            self.cfg,
            run_seed,
            step,
            blocks_of=lambda s: self.workers[s].get_state((BLOCKS,)),
            copy_of=lambda s: lost.get_state((EMBED, HEAD)),
            backup_of=lambda s: self.workers[s].get_state(include_optim=True),
        )
        self.workers[stage] = self._fresh(stage, src.lr, *src.sources, weights=src.weights)
        return {
            "method": recipe.method,
            "sources": list(recipe.sources),
            "weights": list(recipe.weights),
            "norms": weighing_norms(rec, self.grad_norms),
        }

    def _fresh(self, stage: int, lr: float | None, *sources, weights: tuple[float, ...] = ()) -> LocalStage:
        opt = self.spec.optim
        worker = LocalStage(self.cfg, opt.grad_clip, opt.weight_decay)
        worker.configure(stage, lr, *sources, weights=weights)
        return worker


def cache_uri(spec: TrainSpec) -> str:
    """The trained artifact's folder: keyed by the fingerprint of every input of the spec (a changed spec retrains)."""
    return str(CACHE / digest(spec_inputs(spec))[:16])


def trained_pipeline(
    spec: TrainSpec,
    val: tuple[torch.Tensor, torch.Tensor],
    until: int | None = None,
    every: int = 250,
    log: Callable[[str], None] = print,
) -> tuple[LocalPipeline, History]:
    """`spec`'s run trained up to step `until` (default `spec.steps`), from its cached engine checkpoint.

    Trains (resuming from the newest checkpoint of an interrupted run) with a validation loss every `every` steps,
    saving an engine checkpoint (one shard per stage, the gradient norms and spec in the metadata, the history)
    at each. Returns the pipeline at step `until` and its training history. The run keeps one checkpoint, so a
    cache already past `until` is refused.
    """
    until = spec.steps if until is None else until
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": cache_uri(spec)})})
    run = open_run(spec)
    store = CheckpointStore(f"{spec.output.uri}/checkpoints", keep=1, run=run)
    pipeline, history, start = LocalPipeline(spec), History(), 0
    latest = store.latest()
    if latest is not None and latest > until:
        raise ValueError(
            f"the cached run {store.uri} is at step {latest}, past the requested {until}; ask for "
            f"step {latest} or delete {spec.output.uri} to retrain"
        )
    if latest is not None:
        checkpoint = store.load(latest, pipeline.S)
        pipeline.restore(
            ([load_safetensors(s) for s in checkpoint.shards], checkpoint.metadata["grad_norms"])
        )
        restore_history(history, checkpoint.history or {})
        start = latest
        log(f"  trained model: step {latest} from {store.checkpoint_uri(latest)}")
    corpus = make_corpus(spec.data, spec.model.seq_len, spec.seed)
    began = time.monotonic()
    for step in range(start + 1, until + 1):
        history.steps.append(step)
        history.losses.append(pipeline.train_step(step, corpus))
        if step % every == 0 or step == until:
            history.val_steps.append(step)
            history.val_losses.append(pipeline.evaluate(*val))
            metadata = {
                "grad_norms": pipeline.grad_norms,
                "spec": spec.model_dump(mode="json"),
                "torch": torch.__version__,
            }
            store.save(step, [w.state_bytes() for w in pipeline.workers], metadata, save_history(history))
            log(
                f"  training: step {step} val {history.val_losses[-1]:.4f} "
                f"({(time.monotonic() - began) / (step - start):.3f} s/step)"
            )
    return pipeline, history
