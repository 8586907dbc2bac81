"""Temperature scaling: ECE on known cases, recovered temperatures, grad contexts, RNG, argmax."""

from __future__ import annotations

import pytest
import torch

from fusion.calibration import (
    Calibration,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    fit_view_weights,
)


def _calibrated_logits(
    n: int = 20000, k: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, k)`` and labels ``(n,)`` drawn from ``softmax(logits)``: calibrated at T = 1."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g).squeeze(1)
    return logits, labels


def test_ece_of_calibrated_confidences_is_small() -> None:
    g = torch.Generator().manual_seed(1)
    n, k = 20000, 3
    confidence = 1 / k + (1 - 1 / k) * torch.rand(n, generator=g)
    top = torch.randint(k, (n,), generator=g)
    probs = ((1 - confidence) / (k - 1)).unsqueeze(1).repeat(1, k)
    probs[torch.arange(n), top] = confidence
    right = torch.rand(n, generator=g) < confidence
    # A wrong label is the top class shifted by 1 or 2 (mod k), never the top class itself.
    other = (top + 1 + torch.randint(k - 1, (n,), generator=g)) % k
    labels = torch.where(right, top, other)
    assert expected_calibration_error(probs, labels) < 0.02
    # The same confidences with every label wrong: ECE is the mean confidence, about 2/3.
    assert expected_calibration_error(probs, other) == pytest.approx(float(confidence.mean()))


def test_ece_by_hand() -> None:
    probs = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # confidence 0.9, predicts 0, label 0: right
            [0.2, 0.7, 0.1],  # confidence 0.7, predicts 1, label 0: wrong
            [0.4, 0.3, 0.3],  # confidence 0.4, predicts 0, label 1: wrong
            [0.3, 0.3, 0.4],  # confidence 0.4, predicts 2, label 2: right
        ]
    )
    labels = torch.tensor([0, 0, 1, 2])
    # Two bins. (0, 0.5]: rows 3-4, accuracy 1/2, confidence 0.4 -> 2/4 * |0.5 - 0.4| = 0.05.
    # (0.5, 1]: rows 1-2, accuracy 1/2, confidence 0.8 -> 2/4 * |0.5 - 0.8| = 0.15. ECE = 0.2.
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.2)
    # One bin: accuracy 1/2, mean confidence 0.6 -> 0.1.
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.1)
    # A confidence of exactly 0.5 falls in (0, 0.5], alone with the wrong row 3 below:
    # bin (0, 0.5]: accuracy 1/2, confidence 0.45 -> |0.05|; ECE = 0.05.
    edge = torch.tensor([[0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])
    assert expected_calibration_error(edge, torch.tensor([0, 1]), n_bins=2) == pytest.approx(0.05)


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_recovers_the_scale(scale: float) -> None:
    logits, labels = _calibrated_logits()
    result = calibrate(logits * scale, labels)
    assert isinstance(result, Calibration)
    assert result.temperature == pytest.approx(scale, rel=0.1)
    assert result.ece_after < result.ece_before
    assert result.nll_after <= result.nll_before
    assert result.ece_after < 0.03


def test_fits_inside_inference_mode_and_no_grad() -> None:
    logits, labels = _calibrated_logits(n=5000)
    with torch.inference_mode():
        scaled = logits * 3.0
        frozen_labels = labels.clone()
        assert scaled.is_inference()
        t_inference = fit_temperature(scaled, frozen_labels)
        result = calibrate(scaled, frozen_labels)
    with torch.no_grad():
        t_no_grad = fit_temperature(logits * 3.0, labels)
    assert t_inference == pytest.approx(3.0, rel=0.1)
    assert t_no_grad == pytest.approx(t_inference)
    assert result.temperature == pytest.approx(t_inference)


def test_argmax_kept_and_global_rng_untouched() -> None:
    logits, labels = _calibrated_logits(n=5000, seed=2)
    logits = logits * 3.0
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    t = fit_temperature(logits, labels)
    calibrate(logits, labels)
    assert torch.equal(torch.rand(8), expected)
    assert t > 0
    scaled = torch.softmax(logits / t, dim=1)
    assert torch.equal(scaled.argmax(dim=1), logits.argmax(dim=1))


def test_temperature_is_clamped() -> None:
    logits, _ = _calibrated_logits(n=2000, seed=3)
    # Every argmax right: NLL keeps falling as T -> 0; every argmax wrong: it falls as T grows.
    assert fit_temperature(logits, logits.argmax(dim=1)) == pytest.approx(0.05)
    assert fit_temperature(logits, logits.argmin(dim=1)) == pytest.approx(20.0)


def test_empty_input_raises() -> None:
    empty = torch.empty(0, 3)
    no_labels = torch.empty(0, dtype=torch.int64)
    with pytest.raises(ValueError):
        expected_calibration_error(empty, no_labels)
    with pytest.raises(ValueError):
        fit_temperature(empty, no_labels)
    with pytest.raises(ValueError):
        calibrate(empty, no_labels)


def test_view_weights_recover_how_far_each_head_can_be_trusted() -> None:
    # Labels drawn from softmax(z1 + 0.5 z2): head 1 deserves weight 1, head 2 weight 0.5, and
    # a head of pure noise (it memorised something that does not hold here) about 0.
    g = torch.Generator().manual_seed(4)
    z1, z2 = 2.0 * torch.randn(30000, 4, generator=g), 2.0 * torch.randn(30000, 4, generator=g)
    labels = torch.multinomial(torch.softmax(z1 + 0.5 * z2, dim=1), 1, generator=g).squeeze(1)
    noise = 3.0 * torch.randn(30000, 4, generator=g)
    w1, w2, w3 = fit_view_weights([z1, z2, noise], labels)
    assert w1 == pytest.approx(1.0, abs=0.05) and w2 == pytest.approx(0.5, abs=0.05)
    assert w3 < 0.08
    # One head: the weight is the inverse temperature.
    (w,) = fit_view_weights([z1 * 2.0], labels)
    assert 1 / w == pytest.approx(fit_temperature(z1 * 2.0, labels))
    with pytest.raises(ValueError, match="no heads"):
        fit_view_weights([], labels)
