"""The linear probe: logistic regression on frozen ViT features, C and temperature from val."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.linear_probe import ABSENT, LinearProbe, probe_features


def blobs(n: int, num_classes: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, overlapping enough that the probe makes mistakes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centres = rng.normal(scale=1.2, size=(num_classes, dim))
    return centres[labels] + rng.normal(size=(n, dim)), labels


def test_probe_features_are_the_cls_and_the_mean_patch_token() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float16).reshape(2, 5, 3)
    features = probe_features(tokens)
    assert features.shape == (2, 6) and features.dtype == np.float64
    assert np.allclose(features[:, :3], tokens[:, 0].float().numpy())
    assert np.allclose(features[:, 3:], tokens[:, 1:].float().mean(dim=1).numpy())


def test_probe_chooses_c_on_val_refits_on_train_and_val_and_is_calibrated() -> None:
    x, y = blobs(900, 4)
    train, val, test = np.arange(0, 500), np.arange(500, 700), np.arange(700, 900)
    probe = LinearProbe.fit(x, y, train, val, num_classes=5)  # class 4 has no rows at all
    assert probe.C in (0.01, 0.03, 0.1, 0.3, 1.0) and 0.05 <= probe.temperature <= 20
    assert probe.model.n_features_in_ == 16 and len(probe.scaler.mean_) == 16
    assert probe.scaler.n_samples_seen_ == len(train) + len(val)  # the refit saw val too
    probs = probe.probabilities(x[test], num_classes=5)
    assert probs.shape == (200, 5) and np.allclose(probs.sum(axis=1), 1.0)
    assert probs[:, 4].max() < 1e-6  # a class without training rows is never predicted
    assert (probe.logits(x[test], 5)[:, 4] == ABSENT).all()
    assert (probs.argmax(axis=1) == y[test]).mean() > 0.6
    # The probe is no better than chance on labels that carry no signal.
    shuffled = np.random.default_rng(1).permutation(y)
    noise = LinearProbe.fit(x, shuffled, train, val, num_classes=4)
    assert (noise.probabilities(x[test], 4).argmax(axis=1) == shuffled[test]).mean() < 0.4
    assert noise.temperature > probe.temperature  # and says so: flatter probabilities


def test_probe_needs_rows_to_choose_on() -> None:
    x, y = blobs(40, 2)
    with pytest.raises(ValueError, match="val rows to choose C on"):
        LinearProbe.fit(x, y, np.arange(40), np.arange(0), num_classes=2)
