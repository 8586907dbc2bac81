"""Classification metrics (OA, macro-F1, kappa, per-class F1) and a confusion-matrix plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from fusion.plots import save_figure


def classification_metrics(num_classes: int) -> MetricCollection:
    """``OA``, ``macro_f1``, ``kappa``, ``f1_per_class (K,)`` and ``confusion (K, K)``."""
    return MetricCollection(
        {
            "OA": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "kappa": MulticlassCohenKappa(num_classes),
            "f1_per_class": MulticlassF1Score(num_classes, average="none"),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }
    )


def draw_confusion(
    ax: plt.Axes,
    confusion: np.ndarray | torch.Tensor,
    classes: Sequence[str],
    title: str = "",
    class_labels_y: bool = True,
) -> matplotlib.image.AxesImage:
    """Draw a ``(K, K)`` confusion matrix (rows: true, columns: predicted) coloured by row share."""
    matrix = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(matrix):
        color = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, str(int(n)), ha="center", va="center", color=color, fontsize=7)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes if class_labels_y else [], fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def plot_confusion(
    confusion: np.ndarray | torch.Tensor,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Write a confusion matrix as a PNG."""
    size = 1.2 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = draw_confusion(ax, confusion, classes, title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="share of true class")
    fig.tight_layout()
    return save_figure(fig, path)
