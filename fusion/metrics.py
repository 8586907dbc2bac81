"""Classification metrics, one definition for training logs, ``fusion test``, ``fusion predict``
and the experiments, and a confusion-matrix plot.

Every number comes from the confusion matrix of the evaluated rows (:func:`scores`):

- ``OA``: share of rows predicted right.
- ``macro_f1``: mean F1 over the classes **present in the evaluated truth**. A class that is
  predicted but absent from the truth adds no term (its predictions are misses of the true
  classes, lowering their recall); a class absent from both adds none either. So two runs judged on
  the same rows always average the same classes, whatever they predict.
- ``kappa``: Cohen's kappa.
- ``f1_per_class (K,)``: F1 of each class; NaN for a class absent from the truth.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchmetrics import Metric

from fusion.plots import save_figure

SCALARS = ("OA", "macro_f1", "kappa")


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows true class, columns predicted, of ``labels (N,)`` and ``preds (N,)``
    (class indexes)."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray | torch.Tensor) -> dict[str, float | np.ndarray]:
    """``OA``, ``macro_f1``, ``kappa`` (floats; NaN without rows) and ``f1_per_class (K,)`` of a
    ``(K, K)`` confusion matrix (see the module docstring)."""
    c = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion)
    c = c.astype(np.float64)
    n = c.sum()
    tp = np.diag(c)
    support, predicted = c.sum(axis=1), c.sum(axis=0)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / (support + predicted), np.nan)
        oa = tp.sum() / n
        chance = (support * predicted).sum() / n**2
        kappa = (oa - chance) / (1 - chance) if chance < 1 else float(oa == 1.0)
    return {
        "OA": float(oa),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "kappa": float(kappa),
        "f1_per_class": f1,
    }


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``labels (N,)`` (see :func:`scores`)."""
    return float(scores(confusion_matrix(labels, preds, num_classes))["macro_f1"])


class ClassificationScores(Metric):
    """:func:`scores` as a torchmetrics metric: accumulates the confusion matrix over batches
    (summed across processes under DDP); ``compute()`` returns ``OA``, ``macro_f1``, ``kappa``,
    ``f1_per_class (K,)`` and ``confusion (K, K)`` as tensors."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits (B, K)`` (or any scores whose argmax is the prediction), ``labels (B,)``."""
        k = self.num_classes
        flat = labels.long() * k + logits.argmax(dim=-1).long()
        self.confusion += torch.bincount(flat, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, torch.Tensor]:
        values = scores(self.confusion)
        out = {name: torch.tensor(values[name], dtype=torch.float32) for name in SCALARS}
        out["f1_per_class"] = torch.tensor(values["f1_per_class"], dtype=torch.float32)
        out["confusion"] = self.confusion.clone()
        return out


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
) -> None:
    """Write a confusion matrix as a PNG."""
    size = 1.2 + 0.75 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = draw_confusion(ax, confusion, classes, title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, label="share of true class")
    fig.tight_layout()
    save_figure(fig, path)
