"""CheckFree training: what a run writes (`TrainResult`, to `output.uri/result.json`), its failure records and the
hybrid strategy's checkpoint-interval records."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.common import StrictModel
from schemas.train import TrainSpec

# How one lost stage came back: gradient-weighted average of its neighbours, copy of its CheckFree+ swap
# partner, the predecessor's redundant backup, or a rollback of the whole model to a checkpoint.
RecoveryMethod = Literal["checkfree", "copy", "redundant", "checkpoint", "handoff"]
# Where a step was when a stage was lost (FailureRecord.phase).
FailurePhase = Literal["before_step", "forward", "backward", "optimizer", "checkpoint_save", "recovery"]


class CheckpointInterval(StrictModel):
    """Hybrid: the checkpoint interval chosen at a step, and why (Young/Daly, `checkfree_ray/hybrid.py`)."""

    step: int = Field(description="Step after which this interval was chosen.")
    every: int = Field(description="Steps between checkpoint saves from then on.")
    interval_s: float | None = Field(
        description="Young/Daly seconds sqrt(2 x save_cost_s x mtbf_s); None: no rollback "
        "expected (the upper bound applies)."
    )
    save_cost_s: float = Field(description="Mean measured seconds per save (start to manifest).")
    mtbf_s: float | None = Field(
        description="Estimated mean seconds between losses CheckFree+ cannot rebuild (two "
        "adjacent stages in one step)."
    )
    stage_mtbf_s: float = Field(description="Estimated mean seconds between losses of one stage.")
    failures_seen: int = Field(description="Stage losses seen when it was chosen.")
    rollbacks_seen: int = Field(description="Rollbacks seen when it was chosen.")
    prior: str = Field(description="Where the prior failure rate came from.")
    reason: str = Field(description="The whole computation, in words.")


class FailureRecord(StrictModel):
    """One lost stage and how it was recovered."""

    step: int = Field(description="Step during which the stage was lost.")
    stage: int = Field(description="Index of the lost stage.")
    method: RecoveryMethod = Field(
        description="How it was recovered: 'checkfree' (neighbours' average), 'copy' (CheckFree+ swap partner), "
        "'redundant' (predecessor's backup), 'checkpoint' (rollback) or 'handoff' (its node was draining: its "
        "exact state, weights and Adam, moved to a standby on another node between two steps; nothing lost)."
    )
    detection_s: float = Field(description="Seconds from the kill to its detection.")
    recovery_s: float = Field(description="Seconds from detection until the retried step started.")
    rolled_back_to: int | None = Field(default=None, description="Checkpoint step restored, if any.")
    death_to_retry_s: float | None = Field(
        default=None,
        description="Seconds from the kill until the retried step started (injected kills only).",
    )
    warm_standby: bool = Field(
        default=False, description="Whether a pre-started standby actor took the stage."
    )
    phase: FailurePhase = Field(
        default="before_step",
        description="Where the step was when the stage was lost (its first call that did not finish): "
        "'before_step' (no call of the step ran), 'forward', 'backward' (the step is run again), 'optimizer' (some "
        "stages had stepped: the step commits, the lost stage rebuilt from the same step's neighbours), "
        "'checkpoint_save', or 'recovery' (while another stage was being rebuilt).",
    )
    reason: Literal["died", "timeout", "drain", "drain_deadline_short", "drain_handoff_failed"] = Field(
        default="died",
        description="'died': its process was gone; 'timeout': it did not answer within the step "
        "timeout (`recovery.step_timeout_s`) and was killed; 'drain': its node was draining and it was handed off; "
        "'drain_deadline_short': its node was draining but the deadline left less time than the copy needed, so it "
        "was recovered once lost; 'drain_handoff_failed': its hand-off failed (a stage or node died during it, or no "
        "standby off the draining nodes), so it was recovered once lost.",
    )


class TrainResult(StrictModel):
    """What a finished training run writes to `output.uri/result.json`."""

    spec: TrainSpec = Field(description="The spec that produced this result.")
    steps: list[int] = Field(description="Step of each training-loss point.")
    losses: list[float] = Field(description="Training loss per step.")
    wall_times: list[float] = Field(description="Seconds since start at each step.")
    rolled_back: list[bool] = Field(
        default_factory=list,
        description="Per entry of `steps`: True when a later rollback to a checkpoint discarded that step's work "
        "(the step then appears again); empty in results written before this field existed.",
    )
    val_steps: list[int] = Field(default_factory=list, description="Steps of the validation evaluations.")
    val_losses: list[float] = Field(default_factory=list, description="Validation loss at each.")
    failures: list[FailureRecord] = Field(default_factory=list, description="Every failure and its recovery.")
    final_val_loss: float | None = Field(default=None, description="Last validation loss.")
    final_perplexity: float | None = Field(default=None, description="exp(final_val_loss).")
    steps_to_target: int | None = Field(default=None, description="First step at the target validation loss.")
    tokens_per_s: float = Field(
        default=0.0,
        description="Training throughput: tokens of the kept steps over the time of every step run "
        "(rolled-back work costs time and adds no tokens).",
    )
    val_perplexities: list[float] = Field(default_factory=list, description="exp(validation loss) at each.")
    model_parameters: int | None = Field(
        default=None, description="Parameters N of the model (embedding included)."
    )
    mfu: float | None = Field(
        default=None,
        description="Model FLOPs utilisation: tokens_per_s x 6N over the stages' summed peak FLOP/s "
        "(`pipeline.peak_flops` or a known GPU's); None on CPU.",
    )
    median_step_s: float | None = Field(default=None, description="Median seconds per committed step.")
    costs: dict[str, float] = Field(
        default_factory=dict,
        description="Strategy costs: redundant bytes held / sent per step, checkpoint bytes and seconds, "
        "CheckFree+ copy bytes.",
    )
    checkpoint_intervals: list[CheckpointInterval] = Field(
        default_factory=list, description="Hybrid: each change of the checkpoint interval, with its reasons."
    )
    node_events: list[dict] = Field(
        default_factory=list,
        description="What the run saw of its nodes, in order, each {time (seconds since the epoch), kind, stage, "
        "node_id, step, ...}: 'stage_lost' (its node or process went; reason), 'stage_rebuilt' (where, by which "
        "method, and `whole_after_s`: seconds from the loss's detection until the pipeline was whole again), "
        "'drain_notice' (its node drains; `deadline`), 'handoff' (moved off the draining node `from_node_id`, "
        "`before_deadline_s` to spare) and 'handoff_failed' (reason).",
    )
    cluster_timeline: dict | None = Field(
        default=None,
        description="Present when the cluster's nodes changed during the run: node joins, leaves (with their "
        "reason) and drains, and the stages alive and steps done, against seconds since the run started "
        "(rayops/cluster_timeline.py); drawn as cluster_timeline.png.",
    )
    wall_time_s: float = Field(description="Wall-clock seconds of the run.")
    files: dict[str, str] = Field(default_factory=dict, description="Artifact name -> URI.")
    run_id: str | None = Field(default=None, description="Identity of the run (kept across resumes).")
    resumed_from: list[int] = Field(
        default_factory=list, description="Checkpoint step each resume of this run started from, in order."
    )
    versions: dict[str, str] = Field(default_factory=dict, description="Package versions.")
