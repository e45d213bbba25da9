"""One pipeline stage: a plain class (`StageWorker`) and its Ray actor (`StageActor`).

A worker starts blank (a warm standby looks exactly like that) and becomes stage i through
`configure`, from a flat state dict (checkpoint shard, redundant backup, CheckFree+ partner copy)
or from the CheckFree average of its two neighbours' states. Flat state keys are
`model/<part>/<name>`, `optim/<part>/<name>/<field>` and `meta/lr`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np
import ray
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from checkfree_ray.model import Embedding, Head, ModelConfig, Stage, lm_loss, optimizer_groups
from checkfree_ray.recovery_rules import BLOCKS, EMBED, HEAD, weighted_sum
from checkfree_ray.stage_faults import FaultInjection
from checkfree_ray.stage_shards import FlatState, ShardWriter, state_nbytes


def _as_flat(source: Mapping[str, torch.Tensor] | bytes) -> Mapping[str, torch.Tensor]:
    return load_safetensors(source) if isinstance(source, (bytes, bytearray)) else source


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor over `value`'s memory: activations and gradients travel as numpy arrays, which Ray's object
    store hands over zero-copy (read-only: an incoming gradient is cloned before autograd may add into it)."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def stage_device(num_gpus: float) -> torch.device:
    """cuda:0 (the GPU Ray assigned, under its CUDA_VISIBLE_DEVICES) when the stage reserves GPUs, else CPU."""
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"`pipeline.num_gpus_per_stage` is {num_gpus} but torch sees no CUDA device in this stage "
            "process; set it to 0 for CPU stages or run on GPU nodes"
        )
    return torch.device("cuda", 0)


def _ray_nccl_available() -> bool:
    """Whether Ray's NCCL collective backend loaded in this process (it needs cupy beside CUDA)."""
    from ray.util.collective import collective

    return collective.nccl_available()


class StageWorker(FaultInjection, ShardWriter):
    """Holds one stage's parts and optimizer, runs its hops, and serves its state for recovery."""

    def __init__(
        self,
        cfg: ModelConfig,
        grad_clip: float,
        weight_decay: float,
        torch_threads: int = 1,
        num_gpus: float = 0.0,
        precision: str = "fp32",
    ):
        torch.set_num_threads(torch_threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.cfg, self.grad_clip, self.weight_decay = cfg, grad_clip, weight_decay
        self.device = stage_device(num_gpus)
        self.autocast = precision == "bf16" and self.device.type == "cuda"  # CPU stages compute in float32
        self.base_lr = 0.0  # this stage's rate before the schedule's factor (`step(lr_factor=...)`)
        self.stage_index: int | None = None
        self.parts: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.cache: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.peak_cached = 0  # most micro-batches whose activations `cache` held at once (`cache_peak`)
        self.copies: FlatState = {}  # CheckFree+: (de)embedding copies of the neighbouring outer stage
        self.backup: FlatState = {}  # redundant: the successor's full state
        self.backup_of_step: int | None = None  # the step `backup` is at
        self.undo: FlatState = {}  # redundant: this stage's state before its last optimizer step
        self.faults: dict[
            str, tuple[str, float, int]
        ] = {}  # test harness only: call -> (action, seconds, skip)

    # ----- identity -------------------------------------------------------------------------------------
    def ping(self) -> dict:
        """Process id, node id and assigned stage (also a liveness check)."""
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "stage": self.stage_index,
            "torch_threads": torch.get_num_threads(),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "nccl": self.device.type == "cuda" and _ray_nccl_available(),
        }

    def warm_up(self) -> dict:
        """Standby: one throwaway training step of a whole model on one sequence, so that lazy imports and
        first-call costs (kernels, autograd, Adam) are paid before this actor is needed; leaves it blank."""
        parts = [Embedding(self.cfg), Stage(self.cfg), Head(self.cfg)]
        params = [p for part in parts for p in part.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=self.weight_decay)
        tokens = torch.zeros(1, self.cfg.seq_len, dtype=torch.long)
        inp = parts[0](tokens).detach().requires_grad_(True)
        loss = lm_loss(parts[2](parts[1](inp)), tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        optimizer.step()
        load_safetensors(save_safetensors({"x": inp.grad}))
        return self.ping()

    # ----- configuration ------------------------------------------------------------------------------
    def configure(
        self,
        stage_index: int,
        lr: float | None,
        *sources: Mapping[str, torch.Tensor] | bytes,
        weights: tuple[float, ...] = (),
    ) -> dict:
        """Become stage `stage_index` with a fresh optimizer at `lr` (None: the sources' `meta/lr`), load `sources`.

        With `weights` the first len(weights) sources are blocks, summed with those coefficients (the CheckFree
        recipe that `recovery_rules.plan_recovery` decided; this only sums). Optimizer tensors in a source restore
        Adam exactly (checkpoint, redundant copy).
        """
        self._fault("configure")
        self.stage_index, last = stage_index, stage_index == self.cfg.num_stages - 1
        self.parts = {BLOCKS: Stage(self.cfg)}
        if stage_index == 0:
            self.parts[EMBED] = Embedding(self.cfg)
        if last:
            self.parts[HEAD] = Head(self.cfg)
        self.cache.clear()
        self.copies, self.backup, self.undo, self.backup_of_step = {}, {}, {}, None
        flats = [_as_flat(source) for source in sources]
        if weights:
            blocks = [_strip(flat, f"model/{BLOCKS}/") for flat in flats[: len(weights)]]
            summed = {f"model/{BLOCKS}/{k}": v for k, v in weighted_sum(blocks, weights).items()}
            flats = [summed, *flats[len(weights) :]]
        state: FlatState = {}
        for flat in flats:
            state.update(flat)
        for module in self.parts.values():
            module.to(self.device)
        self._load_model(state)
        self._new_optimizer(float(state["meta/lr"]) if lr is None else lr)
        self._load_optimizer(state)
        return self.ping()

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{part}/{name}", p)
            for part in (EMBED, BLOCKS, HEAD)
            if part in self.parts
            for name, p in self.parts[part].named_parameters()
        ]

    def _load_model(self, state: Mapping[str, torch.Tensor]) -> None:
        for part, module in self.parts.items():
            part_state = _strip(state, f"model/{part}/")
            if part_state:
                module.load_state_dict(part_state, strict=True)

    def _new_optimizer(self, lr: float) -> None:
        self.base_lr = lr
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self._named_parameters(), self.weight_decay), lr=lr
        )

    def _load_optimizer(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.state.clear()
        for name, param in self._named_parameters():
            fields = _strip(state, f"optim/{name}/")
            if fields:
                self.optimizer.state[param] = {
                    k: v.to(param.device, copy=True) if k != "step" else v.clone() for k, v in fields.items()
                }

    # ----- state for recovery and checkpoints --------------------------------------------------------------
    def get_state(
        self,
        parts: tuple[str, ...] = (EMBED, BLOCKS, HEAD),
        include_optim: bool = False,
        as_tensor: bool = False,
    ) -> FlatState:
        """Flat state of `parts` (those this stage has), with Adam state and lr when `include_optim`; copied to
        the CPU, or kept on this stage's device with `as_tensor` (Ray Direct Transport: device to device)."""
        self._fault("get_state")
        return self._state(parts, include_optim, as_tensor)

    def _state(
        self,
        parts: tuple[str, ...] = (EMBED, BLOCKS, HEAD),
        include_optim: bool = False,
        as_tensor: bool = False,
    ) -> FlatState:
        device = self.device if as_tensor else torch.device("cpu")
        state: FlatState = {}
        for part in parts:
            if part in self.parts:
                for name, tensor in self.parts[part].state_dict().items():
                    state[f"model/{part}/{name}"] = tensor.detach().to(device, copy=True)
        if include_optim:
            for name, param in self._named_parameters():
                if name.split("/", 1)[0] in parts:
                    for field, value in self.optimizer.state.get(param, {}).items():
                        state[f"optim/{name}/{field}"] = value.detach().to("cpu", copy=True)
            state["meta/lr"] = torch.tensor(self.base_lr, dtype=torch.float64)
        return state

    def state_bytes(self) -> bytes:
        """Full state (model, Adam, lr) as safetensors bytes: one checkpoint shard."""
        return save_safetensors(self.get_state(include_optim=True))

    def hold_copy(self, state: FlatState) -> int:
        """CheckFree+: keep a copy of a neighbour's embedding or head; returns bytes held."""
        self.copies.update(state)
        return state_nbytes(self.copies)

    def get_copy(self) -> FlatState:
        """The held (de)embedding copies."""
        return dict(self.copies)

    def hold_backup(self, state: FlatState, step: int | None = None) -> int:
        """Redundant: keep the successor's full state, as it is after `step` (the tag a recovery checks: a backup
        replaces the previous one only once it has arrived, so a failed copy leaves the older step's); returns
        bytes held."""
        self.backup, self.backup_of_step = state, step
        return state_nbytes(state)

    def get_backup(self) -> FlatState:
        """The successor's state held by this stage."""
        return self.backup

    def backup_step(self) -> int | None:
        """The step the held backup is at (None: no backup, or one held without a step)."""
        return self.backup_of_step if self.backup else None

    def lr(self) -> float:
        """This stage's base learning rate (the schedule multiplies it at each step)."""
        return self.base_lr

    # ----- the pipeline ----------------------------------------------------------------------------------
    def forward(
        self,
        micro_batch: int,
        hop: int,
        parts: tuple[str, ...],
        x: np.ndarray | torch.Tensor,
        targets: np.ndarray | torch.Tensor | None = None,
        loss_scale: float = 1.0,
        train: bool = True,
        as_tensor: bool = False,
    ):
        """Run `parts` on x; returns activations (B, T, d) as numpy (the object store's zero-copy form), or as a
        tensor on this stage's device with `as_tensor` (Ray Direct Transport), or the unscaled loss when the head
        runs."""
        self._fault("forward")
        x = _tensor(x).to(self.device)
        with torch.set_grad_enabled(train), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            if EMBED in parts:
                inp, h = None, self.parts[EMBED](x)
            else:
                inp = x.detach().requires_grad_(train)
                h = inp
            if BLOCKS in parts:
                h = self.parts[BLOCKS](h)
            if HEAD in parts:
                loss = lm_loss(self.parts[HEAD](h), _tensor(targets).to(self.device))
                if train:
                    self.cache[(micro_batch, hop)] = (inp, loss * loss_scale)
                    self.peak_cached = max(self.peak_cached, len({mb for mb, _hop in self.cache}))
                return loss.item()
        if train:
            self.cache[(micro_batch, hop)] = (inp, h)
            self.peak_cached = max(self.peak_cached, len({mb for mb, _hop in self.cache}))
        return h.detach().contiguous() if as_tensor else h.detach().float().cpu().numpy()

    def backward(
        self,
        micro_batch: int,
        hop: int,
        grad: np.ndarray | torch.Tensor | None = None,
        as_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor | None:
        """Back-propagate one hop; returns the gradient of its input as numpy, or as a tensor on this stage's
        device with `as_tensor` (None for the embedding hop)."""
        self._fault("backward")
        entry = self.cache.pop((micro_batch, hop), None)
        if entry is None:  # the forward of an interrupted step never ran here; the driver sees its error
            return None
        inp, out = entry
        if grad is None:
            out.backward()
        else:
            out.backward(_tensor(grad).to(self.device, out.dtype, copy=True))  # the received one is read-only
        if inp is None:
            return None
        return inp.grad.contiguous() if as_tensor else inp.grad.float().cpu().numpy()

    def cache_peak(self, reset: bool = True) -> int:
        """The most micro-batches whose activations this stage held at once since the last reset (the schedule's
        memory bound: all of them under GPipe, at most num_stages - stage under 1F1B)."""
        peak = self.peak_cached
        if reset:
            self.peak_cached = 0
        return peak

    def grad_sq_norm(self, *backward_done) -> float:
        """Squared L2 norm of this stage's gradient (global clipping sums these over the stages); runs after
        every micro-batch's last backward hop, passed as `backward_done` only to order it."""
        self._fault("grad_sq_norm")
        return sum(float(p.grad.pow(2).sum()) for _, p in self._named_parameters() if p.grad is not None)

    def step(
        self, *upstream, clip: str = "per_stage", keep_undo: bool = False, lr_factor: float = 1.0
    ) -> dict[str, float]:
        """Clip the gradient, step Adam, and report the gradient L2 norms before and after clipping.

        Clipping and the reported norms cover the same parameters: everything this stage holds (`stage`,
        embedding or head included; `blocks` is the transformer blocks alone). `clip` 'per_stage': this stage's
        norm is clipped to `grad_clip`; 'global': `upstream` are every stage's squared norms (`grad_sq_norm`),
        and all stages scale by the one coefficient of their total, as DeepSpeed and torchtitan clip. With
        'per_stage', `upstream` are the micro-batches' last backward results, passed only so that Ray runs
        this call after all of them and skips it (with their error) when any of them failed. `keep_undo`
        keeps the state before the step (`revert_step`). The step runs at `base_lr * lr_factor` (the schedule).
        """
        self._fault("step")
        named = [(n, p) for n, p in self._named_parameters() if p.grad is not None]
        blocks_sq = sum(float(p.grad.pow(2).sum()) for n, p in named if n.startswith(BLOCKS))
        stage_sq = sum(float(p.grad.pow(2).sum()) for _, p in named)
        total = sum(float(x) for x in upstream) ** 0.5 if clip == "global" else stage_sq**0.5
        coefficient = min(1.0, self.grad_clip / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        if coefficient < 1.0:
            for _, p in named:
                p.grad.mul_(coefficient)
        if keep_undo:
            self.undo = self._state(include_optim=True)  # not `get_state`: its armed fault is for callers
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.cache.clear()
        return {
            "stage": stage_sq**0.5 * coefficient,
            "blocks": blocks_sq**0.5 * coefficient,
            "stage_pre_clip": stage_sq**0.5,
            "blocks_pre_clip": blocks_sq**0.5,
            "clip_coefficient": coefficient,
        }

    def revert_step(self) -> bool:
        """Undo the last optimizer step (weights and Adam) from the state kept with `keep_undo`; False if none."""
        if not self.undo:
            return False
        self._load_model(self.undo)
        self._load_optimizer(self.undo)
        self.undo = {}
        return True

    def reset_step(self) -> int:
        """Drop the cached activations and gradients of an interrupted step; returns entries dropped."""
        dropped = len(self.cache)
        self.cache.clear()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return dropped


StageActor = ray.remote(max_restarts=0, max_task_retries=0)(StageWorker)


class DirectStageWorker(StageWorker):
    """A stage whose `forward`/`backward`/`get_state` may be called with `.options(tensor_transport=...)`
    (`transport.py`). Ray then runs its calls on a background thread, so plain runs keep `StageActor`."""


DirectStageActor = ray.remote(max_restarts=0, max_task_retries=0, enable_tensor_transport=True)(
    DirectStageWorker
)


def initial_stage_state(parts, stage_index: int) -> FlatState:
    """Flat model state of stage `stage_index` from built `ModelParts` (embedding on 0, head on S-1)."""
    modules = {BLOCKS: parts.stages[stage_index]}
    if stage_index == 0:
        modules[EMBED] = parts.embedding
    if stage_index == len(parts.stages) - 1:
        modules[HEAD] = parts.head
    return {
        f"model/{part}/{name}": t.detach().clone()
        for part, module in modules.items()
        for name, t in module.state_dict().items()
    }


def initial_states(spec, cfg: ModelConfig) -> list[FlatState]:
    """Each stage's starting model state: `model.hf_path`'s weights when it has some, else the seed's."""
    from checkfree_ray.hf_llama import initial_stage_states
    from checkfree_ray.model import build_parts

    loaded = initial_stage_states(spec.model, cfg)
    if loaded is not None:
        return loaded
    parts = build_parts(cfg, spec.seed)
    return [initial_stage_state(parts, i) for i in range(cfg.num_stages)]
