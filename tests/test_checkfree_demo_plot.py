"""The CheckFree demo's plot against its no-failure twin: both curves, the failures marked, a real PNG."""

from __future__ import annotations

import io

import matplotlib.image as mpimg

from checkfree_ray.demo import demo_spec
from checkfree_ray.plots import loss_vs_step_with_twin_png
from schemas.train_result import FailureRecord, TrainResult


def _run(losses: list[float], failures: list[FailureRecord]) -> TrainResult:
    steps = list(range(1, len(losses) + 1))
    return TrainResult(
        spec=demo_spec(),
        steps=steps,
        losses=losses,
        wall_times=[0.1 * s for s in steps],
        val_steps=[2, 4],
        val_losses=[losses[1], losses[3]],
        failures=failures,
        wall_time_s=1.0,
    )


def test_twin_plot_draws_both_runs_and_marks_each_failure(monkeypatch):
    """Two loss curves (with failures, twin), two validation series and one red line per failure."""
    import matplotlib.axes

    calls: dict[str, list] = {"plot": [], "axvline": []}
    real_plot, real_axvline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axvline

    def plot(self, *args, **kwargs):
        calls["plot"].append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    def axvline(self, x=0, *args, **kwargs):
        calls["axvline"].append(x)
        return real_axvline(self, x, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", axvline)
    failures = [
        FailureRecord(step=2, stage=1, method="checkfree", detection_s=0.1, recovery_s=0.2),
        FailureRecord(step=3, stage=0, method="copy", detection_s=0.1, recovery_s=0.2),
    ]
    png = loss_vs_step_with_twin_png(_run([3.0, 2.9, 2.95, 2.7], failures), _run([3.0, 2.8, 2.6, 2.5], []))
    image = mpimg.imread(io.BytesIO(png), format="png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert calls["plot"] == ["no failures (twin)", "2 failure(s)", "validation, twin", "validation"]
    assert calls["axvline"] == [2, 3]
