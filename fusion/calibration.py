"""Temperature scaling of a classifier's logits, and the calibration error it is judged by.

Guo, Pleiss, Sun and Weinberger (2017), "On Calibration of Modern Neural Networks", ICML: one
scalar ``T > 0`` divides every logit, ``softmax(logits / T)``, and is fitted by minimising the
negative log-likelihood on held-out (validation) samples. Dividing by a positive scalar never
changes the predicted class, so accuracy is untouched; only the confidences move. Calibration is
measured by the expected calibration error (ECE) over equal-width confidence bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

T_MIN = 0.05
T_MAX = 20.0


def _check(scores: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` unless ``scores`` is non-empty ``(N, K)`` and ``labels`` ``(N,)``."""
    if scores.ndim != 2:
        raise ValueError(f"{what} must be (N, K), got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {scores.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(scores.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}"
        )


def _cpu64(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached float64 ``(N, K)`` and int64 ``(N,)`` CPU copies (normal tensors, not inference)."""
    with torch.inference_mode(False):
        return (
            scores.detach().to("cpu", torch.float64).clone(),
            labels.detach().to("cpu", torch.int64).clone(),
        )


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    """ECE of ``probs (N, K)`` (rows summing to 1) against ``labels (N,)``.

    Confidence is each row's largest probability; samples fall in ``n_bins`` equal-width bins
    ``(i / n_bins, (i + 1) / n_bins]`` over ``(0, 1]``; the ECE is the sum over bins of the bin's
    share of samples times ``|accuracy - mean confidence|`` within it.
    """
    _check(probs, labels, "probs")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    p, y = _cpu64(probs, labels)
    confidence, predicted = p.max(dim=1)
    correct = (predicted == y).to(torch.float64)
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # right=False: bin i holds edge_i < c <= edge_{i+1}, i.e. bins closed on the right.
    bins = torch.bucketize(confidence, inner_edges, right=False)
    count = torch.bincount(bins, minlength=n_bins).to(torch.float64)
    conf_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    # Per bin, share * |acc - conf| = |correct_sum - conf_sum| / N; empty bins add 0.
    return float((correct_sum - conf_sum).abs().sum() / count.sum())


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)``; float64 ``logits (N, K)``, ``labels (N,)``."""
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The ``T`` in ``[0.05, 20]`` minimising the mean NLL of ``softmax(logits / T)``.

    ``logits (N, K)``, ``labels (N,)``. Optimises ``log T`` from 0 (``T = 1``) with L-BFGS
    (strong Wolfe line search) in float64 on detached CPU copies; gradients are enabled locally,
    so callers may be inside ``torch.no_grad()`` or ``torch.inference_mode()``. Draws no random
    numbers.
    """
    _check(logits, labels, "logits")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = _cpu64(logits, labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x * torch.exp(-log_t), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        value = float(log_t.detach())
    if math.isnan(value):
        raise RuntimeError("temperature fit diverged (log T is NaN)")
    return min(max(math.exp(min(value, 700.0)), T_MIN), T_MAX)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature, and ECE and mean NLL before (``T = 1``) and after scaling."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def calibration_errors(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int = 15
) -> tuple[float, float]:
    """ECE of ``softmax(logits (N, K))`` against ``labels (N,)``: raw, and at ``temperature``."""
    x, y = _cpu64(logits, labels)
    with torch.no_grad():
        return (
            expected_calibration_error(torch.softmax(x, dim=1), y, n_bins),
            expected_calibration_error(torch.softmax(x / temperature, dim=1), y, n_bins),
        )


def calibrate(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> Calibration:
    """Fit ``T`` on ``logits (N, K)`` and ``labels (N,)``; report ECE (``n_bins`` bins) and NLL."""
    temperature = fit_temperature(logits, labels)
    ece_before, ece_after = calibration_errors(logits, labels, temperature, n_bins)
    x, y = _cpu64(logits, labels)
    with torch.no_grad():
        return Calibration(
            temperature=temperature,
            ece_before=ece_before,
            ece_after=ece_after,
            nll_before=_nll(x, y, 1.0),
            nll_after=_nll(x, y, temperature),
        )
