"""PNG figures for MLflow and the reports folder: ROC, confusion matrix, data efficiency.

Matplotlib with the Agg backend (no display needed); each function writes one file and
returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC"
) -> Path:
    """ROC curves of binary predictions: ``{name: (labels, positive_scores)}``."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, (labels, scores) in curves.items():
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str
) -> Path:
    """A labelled confusion matrix (rows: truth, columns: prediction)."""
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.8, 3.4), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_yticklabels(classes)
    return _save(fig, path)


def plot_data_efficiency(
    results: Mapping[str, Sequence[tuple[int, float]]], path: str | Path
) -> Path:
    """Test AUC against the number of labelled training images, one line per strategy."""
    fig, ax = plt.subplots(figsize=(5, 3.8), dpi=110)
    for strategy, points in results.items():
        points = sorted(points)
        ax.plot([n for n, _ in points], [auc for _, auc in points], marker="o", label=strategy)
    ax.set(
        xlabel="labelled training images",
        ylabel="test ROC AUC",
        title="What transfer buys",
        xscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, bins: int = 10
) -> Path:
    """A reliability diagram: accuracy against mean top-class confidence per bin, one line per
    ``{name: (labels, probabilities (N, C))}`` (before and after calibration)."""
    from tasks.evaluation.metrics import reliability_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, (labels, probabilities) in curves.items():
        points = reliability_curve(labels, probabilities, bins)
        ax.plot(
            [p["confidence"] for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            label=name,
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(
        xlabel="confidence (top-class probability)",
        ylabel="accuracy",
        title="Reliability (test)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_image_grid(
    images: Sequence[np.ndarray],
    overlays: Sequence[np.ndarray | None],
    captions: Sequence[str],
    path: str | Path,
    columns: int = 4,
) -> Path:
    """Images (float [0, 1], ``(H, W)`` gray or ``(H, W, 3)`` RGB) with optional heat-map
    overlays (Grad-CAM) and a caption each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.4 * columns, 2.6 * rows), dpi=100, squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, overlay, caption in zip(axes.ravel(), images, overlays, captions, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if overlay is not None:
            ax.imshow(overlay, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
