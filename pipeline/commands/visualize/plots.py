"""Matplotlib figures (Agg backend) as PNG bytes: curves, training signals, confusion matrix, filters,
feature maps and Grad-CAM galleries.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 80


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _values(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    epochs, values = [], []
    for record in history:
        if key in record:
            try:
                values.append(float(record[key]))
            except (TypeError, ValueError):
                values.append(math.nan)
            epochs.append(int(record.get("epoch", len(epochs) + 1)))
    return epochs, values


LOG_SPAN = 20.0
"""A loss axis whose largest value is this many times its smallest is drawn on a log scale: one blown-up epoch (a
validation loss of 1,315 beside 0.5) would otherwise flatten every other epoch onto the floor."""


def curves_png(history: Sequence[dict]) -> bytes:
    """Loss and accuracy (train vs validation) and the learning rate per epoch; the loss on a log scale when its
    values span more than `LOG_SPAN`."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, metric in zip(axes[:2], ("loss", "accuracy")):
        shown = []
        for split, style in (("train", "-o"), ("val", "-s")):
            epochs, values = _values(history, f"{split}/{metric}")
            ax.plot(epochs, values, style, markersize=3, label=split)
            shown += [v for v in values if math.isfinite(v) and v > 0]
        if metric == "loss" and shown and max(shown) > LOG_SPAN * min(shown):
            ax.set_yscale("log")
            metric = "loss (log scale)"
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    lr_keys = sorted(k for k in history[-1] if k.startswith("lr/")) or ["lr"]
    for key in lr_keys:
        epochs, values = _values(history, key)
        axes[2].plot(epochs, values, "-", label=key)
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    return _png(fig)


def signals_png(history: Sequence[dict]) -> bytes | None:
    """Gradient norms per layer group (log scale), weight norms and throughput; None if not logged."""
    grad_keys = sorted(k for k in history[-1] if k.startswith("grad_norm/") and k != "grad_norm/global_max")
    if not grad_keys:
        return None
    weight_keys = sorted(k for k in history[-1] if k.startswith("weight_norm/"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key in grad_keys:
        axes[0].plot(*_values(history, key), label=key.split("/", 1)[1], linewidth=2.2 if key.endswith("global") else 1)
    axes[0].set_yscale("log")
    axes[0].set_title("gradient norm (mean per step)")
    for key in weight_keys:
        axes[1].plot(*_values(history, key), label=key.split("/", 1)[1])
    axes[1].set_title("weight norm")
    axes[2].plot(*_values(history, "images_per_second"), "-o", markersize=3)
    axes[2].set_title("training images / s")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return _png(fig)


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    matrix = np.asarray(confusion)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        peak = matrix.max() or 1
        for i in ticks:
            for j in ticks:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    return _png(fig)


def _gallery(count: int, most_cols: int, cell: tuple[float, float]) -> tuple[plt.Figure, list]:
    """A figure of `count` tiles, at most `most_cols` a row, each `cell` inches; the axes of the tiles, axes off
    (the spare ones of the last row stay blank)."""
    cols = max(1, min(count, most_cols))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell[0], rows * cell[1]), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def filters_png(weight: torch.Tensor) -> bytes:
    """The first convolution's kernels: RGB when it reads 3 channels, else the mean over input channels."""
    fig, tiles = _gallery(weight.shape[0], 8, (0.9, 0.9))
    for kernel, ax in zip(weight, tiles, strict=True):
        if kernel.shape[0] == 3:
            low, high = kernel.min(), kernel.max()
            ax.imshow(((kernel - low) / (high - low + 1e-12)).permute(1, 2, 0).numpy())
        else:
            ax.imshow(kernel.mean(dim=0).numpy(), cmap="gray")
    return _png(fig)


def to_display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (C, H, W) tensor back to an (H, W) or (H, W, 3) array in [0, 1]."""
    channels = image.shape[0]
    mean_t = torch.tensor(list(mean) * (channels if len(mean) == 1 else 1))[:, None, None]
    std_t = torch.tensor(list(std) * (channels if len(std) == 1 else 1))[:, None, None]
    shown = (image.cpu() * std_t + mean_t).clamp(0, 1)
    return shown[0].numpy() if channels == 1 else shown.permute(1, 2, 0).numpy()


def feature_maps_png(image: np.ndarray, maps: dict[str, torch.Tensor], channels: int, title: str = "") -> bytes:
    """The input image, then for each layer a row of its first `channels` activation maps."""
    rows = len(maps)
    cols = min(channels, max(m.shape[0] for m in maps.values())) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.95, rows * 1.15 + 0.3), squeeze=False)
    for row, (name, activation) in enumerate(maps.items()):
        axes[row, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[row, 0].set_title(name, fontsize=7, loc="left")
        for col in range(1, cols):
            axes[row, col].axis("off")
            if col - 1 < activation.shape[0]:
                axes[row, col].imshow(activation[col - 1].numpy(), cmap="viridis")
        axes[row, 0].axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def gradcam_png(images: Sequence[np.ndarray], cams: torch.Tensor, captions: Sequence[str]) -> bytes:
    """Each image with its Grad-CAM heat map overlaid (jet, alpha 0.45) and a caption."""
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    fig, tiles = _gallery(len(images), 6, (1.9, 1.8 + 0.16 * lines))  # room for every caption line: no overlap
    for image, cam, caption, ax in zip(images, cams, captions, tiles, strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.imshow(cam.numpy(), cmap="jet", alpha=0.45)
        ax.set_title(caption, fontsize=7)
    fig.subplots_adjust(hspace=0.2 * lines, wspace=0.05)  # titles sit between the rows
    return _png(fig)
