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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
