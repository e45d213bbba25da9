"""Training loss against wall-clock time, with failures marked (matplotlib, Agg backend)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from schemas.train_result import TrainResult


def loss_vs_time_png(result: TrainResult) -> bytes:
    """PNG bytes: training loss (and validation loss) against seconds, a red line at each failure."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(result.wall_times, result.losses, lw=1, label="train loss")
    if result.val_steps:
        time_of = dict(zip(result.steps, result.wall_times))
        times = [time_of.get(s, float("nan")) for s in result.val_steps]
        ax.plot(times, result.val_losses, "o-", ms=3, label="validation loss")
    time_of_step = dict(zip(result.steps, result.wall_times))
    for index, failure in enumerate(result.failures):
        t = time_of_step.get(failure.step)
        if t is not None:
            ax.axvline(t, color="red", alpha=0.5, lw=1, label="failure" if index == 0 else None)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"{result.spec.name}: {result.spec.recovery.strategy}, {len(result.failures)} failure(s)")
    ax.legend()
    return _png(fig)


def loss_vs_step_with_twin_png(result: TrainResult, twin: TrainResult) -> bytes:
    """PNG bytes: training loss against step for a run with failures and its no-failure twin (same data, same
    seed), a red line at each failure, so the cost of each failure shows as the gap between the two curves."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(twin.steps, twin.losses, lw=1, color="tab:gray", label="no failures (twin)")
    ax.plot(result.steps, result.losses, lw=1, color="tab:blue", label=f"{len(result.failures)} failure(s)")
    if twin.val_steps:
        ax.plot(twin.val_steps, twin.val_losses, "o--", ms=3, color="tab:gray", label="validation, twin")
    if result.val_steps:
        ax.plot(result.val_steps, result.val_losses, "o-", ms=3, color="tab:blue", label="validation")
    for index, failure in enumerate(result.failures):
        ax.axvline(failure.step, color="red", alpha=0.5, lw=1, label="failure" if index == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"{result.spec.name}: {result.spec.recovery.strategy} against the same run without failures")
    ax.legend()
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as PNG bytes (laid out tightly), closed after."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
