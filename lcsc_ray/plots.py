"""Search plots (PNG, matplotlib Agg): FID against evaluations, and the coefficients of the reported models."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from schemas.search import SearchResult


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def fid_vs_evaluations(trials: pd.DataFrame, result: SearchResult) -> bytes:
    """Each trial's FID in evaluation order, the best so far, and the baselines as horizontal lines."""
    rung0 = trials[trials.rung == 0].reset_index(drop=True)
    fids = rung0.fid.where(rung0.status == "ok")
    finite = fids.replace([np.inf, -np.inf], np.nan)
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = ["tab:orange" if phase == "seeds" else "tab:blue" for phase in rung0.phase]
    ax.scatter(np.arange(1, len(rung0) + 1), finite, c=colors, s=14, label="trial (orange: seeds)")
    ax.plot(np.arange(1, len(rung0) + 1), finite.cummin(), color="black", lw=1.5, label="best so far")
    for baseline in result.baselines:
        ax.axhline(baseline.fid, ls="--", lw=0.8, alpha=0.7)
        ax.annotate(baseline.label, (len(rung0), baseline.fid), fontsize=7, ha="right", va="bottom")
    low, high = np.nanpercentile(finite, [0, 90]) if finite.notna().any() else (0, 1)
    ax.set_ylim(low * 0.95, max(high, *(b.fid for b in result.baselines)) * 1.05)
    ax.set_xlabel("evaluation")
    ax.set_ylabel(
        f"FID ({int(rung0.num_samples.dropna().iloc[0]) if rung0.num_samples.notna().any() else '?'} samples)"
    )
    ax.set_title(f"LCSC search: best {result.best.fid:.2f} vs last {_baseline(result, 'last'):.2f}")
    ax.legend(fontsize=8)
    return _png(fig)


def _baseline(result: SearchResult, label: str) -> float:
    return next((b.fid for b in result.baselines if b.label == label), float("nan"))


def coefficients_plot(result: SearchResult) -> bytes:
    """Bar chart of the winner's coefficients per checkpoint step, beside the best sparse-EMA's."""
    steps = result.checkpoint_steps
    x = np.arange(len(steps))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, result.best.coefficients, width=0.4, label=f"LCSC (FID {result.best.fid:.2f})")
    ema = next((b for b in result.baselines if b.label.startswith("best-sparse")), None)
    if ema is not None:
        ax.bar(x + 0.2, ema.coefficients, width=0.4, label=f"{ema.label} (FID {ema.fid:.2f})", alpha=0.7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [str(s) for s in steps], rotation=60, fontsize=7)
    ax.set_xlabel("checkpoint (training step)")
    ax.set_ylabel("coefficient")
    ax.legend(fontsize=8)
    return _png(fig)


SAMPLES_KEY = "lcsc-samples-rows"  # PNG text chunk of samples.png: its row labels, one per line


def tile_images(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """One row strip (H, N*(W+pad)-pad, C) in [0, 1] from images (N, C, H, W) in [-1, 1]."""
    n, c, h, w = images.shape
    strip = np.ones((h, n * (w + pad) - pad, c), dtype=np.float32)
    for index, image in enumerate(np.clip((images + 1) / 2, 0, 1)):
        strip[:, index * (w + pad) : index * (w + pad) + w] = image.transpose(1, 2, 0)  # (H, W, C)
    return strip


def samples_grid(rows: list[tuple[str, np.ndarray]]) -> bytes:
    """samples.png: one labelled row of images per model, (label, images (N, C, H, W) in [-1, 1]); the labels
    are also stored in the PNG's text chunk `SAMPLES_KEY`, one per line."""
    strips = [tile_images(images) for _, images in rows]
    width = max(s.shape[1] for s in strips)
    image_w = min(12.0, width / 40)  # inches of the image strips
    row_h = image_w * max(s.shape[0] for s in strips) / width + 0.1
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.5 + image_w, 0.4 + row_h * len(rows)), squeeze=False)
    fig.subplots_adjust(hspace=0.08)
    for ax, (label, _), strip in zip(axes[:, 0], rows, strips):
        gray = strip.shape[2] == 1
        ax.imshow(strip[..., 0] if gray else strip, cmap="gray" if gray else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("same noise in every row", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=110,
        bbox_inches="tight",
        metadata={SAMPLES_KEY: "\n".join(label for label, _ in rows)},
    )
    plt.close(fig)
    return buffer.getvalue()
