"""CheckFree training: the spec a user writes (`TrainSpec`); the result a run writes is in `schemas.train_result`."""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from schemas.common import OutputSpec, RaySpec, StrictModel

Strategy = Literal["none", "checkpoint", "redundant", "checkfree", "checkfree+", "hybrid"]


class LlamaSpec(StrictModel):
    """A LLaMa (RMSNorm, rotary embeddings, SwiGLU, causal attention): its size here, or a Hugging Face Llama
    folder (`hf_path`)."""

    hf_path: str | None = Field(
        default=None,
        description="A Hugging Face Llama folder, local or s3://, holding config.json and optionally *.safetensors "
        "weights (one file, or shards with model.safetensors.index.json). The stages are built from its config "
        "(GQA, RMSNorm eps, rope theta and scaling) and loaded from its weights (none: initialised from `seed`); "
        "the size fields below (all but `seq_len`) are then ignored.",
    )

    d_model: int = Field(default=128, ge=8, description="Model width.")
    n_layers: int = Field(default=8, ge=1, description="Transformer blocks, split equally over the stages.")
    n_heads: int = Field(default=4, ge=1, description="Attention heads; must divide d_model.")
    ffn_hidden: int | None = Field(
        default=None, ge=1, description="SwiGLU hidden width; None = 8/3 d rounded."
    )
    seq_len: int = Field(default=128, ge=2, description="Tokens per sequence (bytes).")
    rope_theta: float = Field(default=10000.0, gt=0, description="Rotary embedding base.")
    n_kv_heads: int | None = Field(
        default=None,
        ge=1,
        description="Key/value heads (grouped-query attention); must divide n_heads. None: n_heads.",
    )
    norm_eps: float = Field(default=1e-6, gt=0, description="RMSNorm epsilon.")
    vocab_size: int | None = Field(
        default=None,
        ge=2,
        description="Vocabulary size; None: the tokenizer's (`data.tokenizer`), else 256 bytes.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> LlamaSpec:
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"`model.n_kv_heads` ({self.n_kv_heads}) must divide `model.n_heads` ({self.n_heads})"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"`model.n_heads` ({self.n_heads}) must divide `model.d_model` ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("`model.d_model / model.n_heads` must be even for rotary embeddings")
        return self


class PipelineSpec(StrictModel):
    """How the model is split into stage actors and how micro-batches flow."""

    num_stages: int = Field(default=4, ge=2, description="Transformer stages (one actor each).")
    micro_batches: int = Field(default=4, ge=1, description="Micro-batches per step (GPipe).")
    micro_batch_size: int = Field(default=16, ge=1, description="Sequences per micro-batch.")
    torch_threads: int = Field(default=1, ge=1, description="torch threads per stage actor.")
    placement: Literal["SPREAD", "PACK"] = Field(default="SPREAD", description="Placement-group strategy.")
    num_cpus_per_stage: float = Field(default=0.5, gt=0, description="CPUs reserved per stage actor.")
    warm_standby: bool = Field(default=True, description="Keep a pre-started spare actor for fast recovery.")
    num_gpus_per_stage: float = Field(
        default=0.0,
        ge=0,
        description="GPUs reserved per stage actor; > 0 runs each stage on the GPU Ray assigns it (cuda:0 under "
        "Ray's CUDA_VISIBLE_DEVICES). 0: CPU (the default).",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="bf16",
        description="'bf16': forward and backward under bfloat16 autocast on GPU stages (weights, "
        "Adam and the loss stay float32); CPU stages always compute in float32.",
    )
    peak_flops: float | None = Field(
        default=None,
        gt=0,
        description="Peak FLOP/s of one stage's device, for MFU; None: known GPUs by name "
        "(H100/H200/A100/L40S/A10G/L4/V100/T4 dense bf16), no MFU on CPU.",
    )
    standby_actors: int = Field(
        default=1,
        ge=1,
        description="Warm standby actors kept started (with `warm_standby`); each holds a placement-group bundle. "
        "More than one lets failures that come faster than an actor starts still find one ready.",
    )
    schedule: Literal["gpipe", "1f1b"] = Field(
        default="gpipe",
        description="'gpipe': every forward of a step, then every backward (a stage holds all `micro_batches` "
        "activations at once); '1f1b': warm-up forwards, then one forward and one backward in turn, so stage s holds "
        "at most num_stages - s micro-batches' activations. Both give the same losses and gradients.",
    )
    node_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources each stage (and standby) asks for beside its CPUs and GPUs, to put the stages "
        "on a node type that has them: cluster/aws-spot.yaml's spot workers carry `spot: 1`, so {spot: 0.01} runs "
        "the stages on spot nodes (and makes the autoscaler launch those for them). Empty: any node (the default).",
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels each stage's (and standby's) node must have (a placement-group bundle label "
        "selector): cluster/aws-spot.yaml's spot workers are labelled `market-type: spot`, so {market-type: spot} "
        "runs the stages on spot nodes. Empty: any node (the default).",
    )
    activation_transport: Literal["auto", "object_store", "nccl", "gloo"] = Field(
        default="auto",
        description="How activations, gradients and recovery weights travel between stages: 'object_store' (Ray's "
        "object store); 'nccl' (Ray Direct Transport between GPU stages, experimental in Ray 2.60); 'gloo' (Ray "
        "Direct Transport between CPU stages, mainly to exercise the direct path without GPUs); 'auto': 'nccl' "
        "when every stage has a GPU with NCCL and `recovery.strategy` is 'none' or 'checkpoint', else "
        "'object_store' (in Ray 2.60 a stage lost during a direct transfer takes its neighbour with it, which "
        "would turn one CheckFree loss into two).",
    )

    @model_validator(mode="after")
    def _node_request(self) -> PipelineSpec:
        reserved = sorted(set(self.node_resources) & {"CPU", "GPU", "memory", "object_store_memory"})
        if reserved:
            raise ValueError(
                f"`pipeline.node_resources` may not name {reserved}: set `pipeline.num_cpus_per_stage` or "
                "`pipeline.num_gpus_per_stage` instead, and keep custom resources (e.g. spot) here"
            )
        bad = {k: v for k, v in self.node_resources.items() if not v > 0}
        if bad:
            raise ValueError(f"`pipeline.node_resources` amounts must be > 0, got {bad}")
        ours = sorted(k for k in self.node_labels if k.startswith("ray.io/"))
        if ours or any(not k or not v for k, v in self.node_labels.items()):
            raise ValueError(
                f"`pipeline.node_labels` needs non-empty keys and values without Ray's own `ray.io/` prefix "
                f"(got {dict(self.node_labels)}); e.g. {{market-type: spot}}"
            )
        return self


class DataSpec(StrictModel):
    """Training tokens: a token artifact from `checkfree-ray tokenize`, or byte-level text that ships with Python."""

    source: Literal["python-docs", "python-stdlib"] = Field(
        default="python-docs",
        description="'python-docs': pydoc_data topics prose; 'python-stdlib': .py files "
        "(used when `tokens_uri` is not set).",
    )
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5, description="Held-out tail of the built-in text.")
    tokens_uri: str | None = Field(
        default=None,
        description="A token artifact (local or s3:// folder) written by `checkfree-ray tokenize`: tokens.bin "
        "(nanoGPT uint16/uint32) and index.json with its train and validation splits. None: the built-in text.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="The tokenizers tokenizer.json the tokens were made with (local or s3://); it sets the "
        "vocabulary when `tokens_uri` is not set, is checked against the token index's sha256 and is copied "
        "into the exported model folder. None: the one the token index names, or byte-level.",
    )


class OptimSpec(StrictModel):
    """Adam per stage, with per-stage gradient clipping."""

    lr: float = Field(
        default=1e-3, gt=0, description="Peak learning rate (constant by default, as in the paper)."
    )
    schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="'constant': `lr` throughout; 'cosine': linear warmup over `warmup_steps`, then a cosine from "
        "`lr` to `min_lr` at `decay_steps`.",
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps of the 'cosine' schedule.")
    min_lr: float = Field(default=0.0, ge=0, description="Learning rate at the end of the cosine decay.")
    decay_steps: int | None = Field(
        default=None, ge=1, description="Step at which the cosine reaches `min_lr`; None: the run's `steps`."
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient L2 clip (paper: 1.0).")
    clip: Literal["per_stage", "global"] = Field(
        default="per_stage",
        description="'per_stage': each stage clips its own gradient (every parameter it holds, embedding or head "
        "included) to `grad_clip`; 'global': one norm over all stages, as DeepSpeed and torchtitan clip (each "
        "stage receives every stage's squared norm between backward and its optimizer step).",
    )
    weight_decay: float = Field(
        default=0.0, ge=0, description="AdamW weight decay of the matrices (never of norms and embeddings)."
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> OptimSpec:
        if self.min_lr > self.lr:
            raise ValueError(f"`optim.min_lr` ({self.min_lr}) must not exceed `optim.lr` ({self.lr})")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"`optim.decay_steps` ({self.decay_steps}) must be after `optim.warmup_steps` "
                f"({self.warmup_steps})"
            )
        return self


class RecoverySpec(StrictModel):
    """What happens when a stage is lost."""

    strategy: Strategy = Field(
        default="checkfree+",
        description="Recovery strategy. 'hybrid': CheckFree+ rebuilds a single lost stage, and asynchronous "
        "checkpoints, every Young/Daly interval sqrt(2 x save cost x MTBF) re-tuned as failures are seen "
        "(`recovery.expected_mtbf_s`), catch two adjacent stages lost together (rolled back to the latest one).",
    )
    lr_scale: float = Field(
        default=1.1, gt=0, description="LR multiplier of a rebuilt stage (not compounding)."
    )
    epsilon: float = Field(
        default=1e-4, gt=0, description="Added to each neighbour's gradient norm (paper: 1e-4)."
    )
    grad_norm: Literal["post_clip", "pre_clip"] = Field(
        default="post_clip",
        description="Which gradient L2 norm of a neighbour's last committed step weighs the CheckFree average: "
        "after clipping (the paper's authors) or before it.",
    )
    grad_norm_scope: Literal["stage", "blocks"] = Field(
        default="stage",
        description="Parameters the weighing norm covers: 'stage', everything the stage clips (its blocks, plus "
        "the embedding on the first stage and the head on the last); 'blocks', the transformer blocks only.",
    )
    step_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a step may take before the stages that do not answer are treated as lost (killed, "
        "rebuilt, recorded with reason 'timeout'). None: max(30 s, 10x the median step), 300 s until a step "
        "has been measured.",
    )
    expected_mtbf_s: float | None = Field(
        default=None,
        gt=0,
        description="Hybrid: the prior mean seconds between losses of one stage (its node), worth one failure in "
        "the estimate that the failures seen then update. None: from `failures.hourly_rate` or "
        "`failures.probability_per_step`, else 5% per stage per hour (the paper's lowest rate).",
    )
    rule: Literal["weighted", "average", "copy", "random", "identity"] = Field(
        default="weighted",
        description="How checkfree/checkfree+ rebuild a middle stage: gradient-weighted average of the neighbours "
        "(the paper), plain average, copy of the previous neighbour, or random re-initialisation (the paper's "
        "ablation, Figure 2); 'identity' (a control) rebuilds the stage as an exact skip: fresh blocks whose "
        "output projections are zero.",
    )
    copy_every: int = Field(default=1, ge=1, description="CheckFree+: steps between (de)embedding copies.")
    max_step_retries: int = Field(default=3, ge=0, description="Retries of one step before the run fails.")
    node_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a lost or drained stage's replacement may wait for a node: a warm standby, room on a "
        "live node, or a node the autoscaler launches for the pending placement-group bundle (a cloud spot "
        "instance takes 1-5 minutes). Past it the run stops, naming this field, and a rerun of the same spec "
        "resumes it from its newest checkpoint.",
    )
    drain_poll_s: float | None = Field(
        default=2.0,
        gt=0,
        description="Seconds between the coordinator's looks (between two steps) at Ray's draining nodes; a stage "
        "whose node is draining (a preemption notice) is handed off exactly, weights and Adam, to a standby on "
        "another node before the deadline, or left to this strategy's recovery when the deadline is too short for "
        "the copy. None: draining nodes are not watched.",
    )


class CheckpointingSpec(StrictModel):
    """Periodic full-model checkpoints (the baseline, and the fallback of every strategy)."""

    every: int | None = Field(
        default=None,
        ge=1,
        description="Steps between checkpoints; None: only the 'checkpoint' strategy uses 100. "
        "'hybrid': the most steps between its checkpoints (Young/Daly chooses within; None: 1000).",
    )
    uri: str | None = Field(default=None, description="Where checkpoints go; None: `output.uri`/checkpoints.")
    keep: int = Field(default=2, ge=1, description="Complete checkpoints kept.")


class StorageSpec(StrictModel):
    """How the stage processes reach storage (the driver reads the standard AWS variables of its own machine)."""

    forward_credentials: bool = Field(
        default=False,
        description="Send the driver's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN to the stage "
        "actors, overriding the nodes' own credentials. False: stages use their node's credentials (instance role, "
        "IRSA, the node's environment); only the endpoint, region and storage knobs are sent.",
    )


class FailureSpec(StrictModel):
    """Injected stage failures: real process kills."""

    probability_per_step: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Per-stage per-step failure probability (paper: 0.0009/0.002/0.004).",
    )
    hourly_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Per-stage hourly failure rate; per step p = 1-(1-h)^(t_step/3600).",
    )
    schedule: list[tuple[int, int]] = Field(
        default_factory=list, description="Exact failures as (step, stage_index) pairs, stage_index from 0."
    )
    seed: int = Field(default=0, description="Seed of the failure draws.")

    @model_validator(mode="after")
    def _one_rate(self) -> FailureSpec:
        if self.probability_per_step is not None and self.hourly_rate is not None:
            raise ValueError("set `failures.probability_per_step` or `failures.hourly_rate`, not both")
        if self.probability_per_step is not None and self.probability_per_step >= 0.5:
            warnings.warn(
                f"`failures.probability_per_step` is {self.probability_per_step}: at >= 0.5 most steps lose a stage "
                "and each loss runs its step again, so the work replayed grows quadratically with the run; "
                "paper rates are 0.0009-0.004",
                UserWarning,
                stacklevel=2,
            )
        return self


class TrainSpec(StrictModel):
    """A pipeline-parallel training run that survives lost stages."""

    kind: Literal["train"] = Field(default="train", description="Spec kind; 'train' for CheckFree.")
    name: str = Field(default="checkfree-train", description="Human-readable run name.")
    seed: int = Field(default=0, description="Seed of weights and data order.")
    steps: int = Field(default=200, ge=1, description="Optimizer steps.")
    eval_every: int = Field(default=50, ge=1, description="Steps between validation evaluations.")
    eval_batches: int = Field(default=4, ge=1, description="Validation micro-batches per evaluation.")
    target_val_loss: float | None = Field(
        default=None, gt=0, description="Stop early at this validation loss."
    )
    ray: RaySpec = Field(default_factory=RaySpec, description="Ray connection and resources.")
    model: LlamaSpec = Field(default_factory=LlamaSpec, description="Model size.")
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec, description="Pipeline layout.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training text.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")
    recovery: RecoverySpec = Field(default_factory=RecoverySpec, description="Recovery strategy.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints.")
    failures: FailureSpec = Field(default_factory=FailureSpec, description="Injected failures.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="Storage access of the stage actors."
    )
    output: OutputSpec = Field(
        default_factory=lambda: OutputSpec(uri="outputs/checkfree-train"), description="Result location."
    )

    @model_validator(mode="after")
    def _layers_split(self) -> TrainSpec:
        stages, layers = self.pipeline.num_stages, self.model.n_layers
        if (
            layers % stages and self.model.hf_path is None
        ):  # an hf_path's layers are checked when its config is read
            raise ValueError(
                f"`model.n_layers` ({layers}) must be a multiple of `pipeline.num_stages` ({stages})"
            )
        bad = [s for _, s in self.failures.schedule if not 0 <= s < stages]
        if bad:
            raise ValueError(f"`failures.schedule` stage {bad[0]} is outside 0..{stages - 1}")
        late = [s for s, _ in self.failures.schedule if not 1 <= s <= self.steps]
        if late:
            raise ValueError(f"`failures.schedule` step {late[0]} is outside 1..`steps` ({self.steps})")
        if self.pipeline.activation_transport == "nccl" and self.pipeline.num_gpus_per_stage <= 0:
            raise ValueError(
                "`pipeline.activation_transport` 'nccl' moves tensors between GPUs but `pipeline.num_gpus_per_stage` "
                "is 0; give each stage a GPU, or use 'auto' or 'object_store'"
            )
        strategy = self.recovery.strategy
        if strategy in ("checkfree+", "hybrid"):  # hybrid rebuilds single losses by CheckFree+
            if stages == 3:
                raise ValueError(
                    f"`recovery.strategy` '{strategy}' swaps the outer stage pairs and needs `pipeline.num_stages` "
                    "2 or >= 4, not 3"
                )
            micro = self.pipeline.micro_batches
            if micro < 2 or micro % 2:
                raise ValueError(
                    f"`pipeline.micro_batches` ({micro}) must be even and >= 2 with `recovery.strategy` '{strategy}': "
                    "half of the micro-batches run the swapped order, so that outer stages learn their partner's place"
                )
        return self

    def checkpoint_every(self) -> int | None:
        """Steps between checkpoints: `checkpointing.every`, else 100 for the 'checkpoint' strategy (for 'hybrid', a
        bound: Young/Daly sets its interval, `checkfree_ray/hybrid.py`)."""
        if self.checkpointing.every is not None:
            return self.checkpointing.every
        return 100 if self.recovery.strategy in ("checkpoint", "hybrid") else None
