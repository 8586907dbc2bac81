"""Temperature scaling of a classifier's logits, and the calibration error it is judged by.

Guo, Pleiss, Sun and Weinberger (2017), "On Calibration of Modern Neural Networks", ICML: one
scalar ``T > 0`` divides every logit, ``softmax(logits / T)``, and is fitted by minimising the
negative log-likelihood on held-out (validation) samples. Dividing by a positive scalar never
changes the predicted class, so accuracy is untouched; only the confidences move. Calibration is
measured by the expected calibration error (ECE) over equal-width confidence bins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def calibrated_probabilities(
    logits: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Class probabilities ``softmax(logits / T)``, ``(N, K)`` in the dtype of ``logits (N, K)``.

    The one place the model's calibrated output is computed: training logs, ``fusion test``,
    ``fusion predict`` and the experiments all call it.
    """
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(logits.device, logits.dtype)
    return (logits / temperature).softmax(dim=-1)


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)``; float64 ``logits (N, K)``, ``labels (N,)``."""
    return float(F.cross_entropy(logits / temperature, labels))


def fit_view_weights(
    heads: Sequence[torch.Tensor], labels: torch.Tensor, max_iter: int = 100
) -> tuple[float, ...]:
    """Weights ``w_h`` in ``(0, 20]`` minimising the mean NLL of ``softmax(sum_h w_h z_h)``.

    Temperature scaling for several heads at once: ``heads`` are logits ``z_h (N, K)`` of the
    same rows (e.g. a fused head and per-view experts; a head that does not apply to a row holds
    zeros there), ``labels (N,)``. With one head, ``w = 1 / T``. Fitted on held-out rows, the
    weights say how far each head can be trusted there; a head that does not help there is
    weighed towards 0. With several heads the overall scale is refitted last, so the pool's
    temperature is the NLL optimum for the fitted proportions. Optimises ``log w`` from 0 with
    L-BFGS (strong Wolfe line search) in float64 on detached CPU copies; gradients are enabled
    locally, so callers may be inside ``torch.no_grad()`` or ``torch.inference_mode()``. Draws no
    random numbers.
    """
    if not heads:
        raise ValueError("no heads to weigh")
    for z in heads:
        _check(z, labels, "logits")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("logits must be finite")
    with torch.inference_mode(False), torch.enable_grad():
        xs = [_cpu64(z, labels)[0] for z in heads]
        y = _cpu64(heads[0], labels)[1]
        log_w = torch.zeros(len(xs), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(sum(x * torch.exp(w) for x, w in zip(xs, log_w, strict=True)), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        values = log_w.detach().tolist()
    if any(math.isnan(v) for v in values):
        raise RuntimeError("weight fit diverged (a log weight is NaN)")
    weights = [math.exp(min(v, 700.0)) for v in values]
    if len(heads) > 1:  # then the overall scale alone, exactly: the temperature of the pool
        pooled = sum(w * x for w, x in zip(weights, xs, strict=True))
        (scale,) = fit_view_weights([pooled], y, max_iter)
        weights = [w * scale for w in weights]
    return tuple(min(w, 1 / T_MIN) for w in weights)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The ``T`` in ``[0.05, 20]`` minimising the mean NLL of ``softmax(logits / T)``.

    ``logits (N, K)``, ``labels (N,)``: :func:`fit_view_weights` with one head, ``T = 1 / w``.
    """
    (weight,) = fit_view_weights([logits], labels, max_iter)
    return min(1.0 / weight, T_MAX) if weight > 0 else T_MAX


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
            expected_calibration_error(calibrated_probabilities(x), y, n_bins),
            expected_calibration_error(calibrated_probabilities(x, temperature), y, n_bins),
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
