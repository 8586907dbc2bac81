"""Linear probe on frozen ViT features: the image-only baseline every image branch must match.

The standard test of a pretrained representation (e.g. Oquab et al. 2023, DINOv2, Sec. 7.1): the
backbone stays frozen and a multinomial logistic regression is fitted on its features, here the
CLS token concatenated with the mean patch token, standardised on the training rows. The L2
strength ``C`` is chosen on the validation rows (macro-F1), which also fit a softmax temperature;
then the probe is fitted again on the training and validation rows with that ``C`` and keeps that
temperature, as the neural models are refitted on all their places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fusion.calibration import calibrated_probabilities, fit_temperature
from fusion.metrics import macro_f1
from fusion.models.vit import cls_and_mean

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
ABSENT = -1e4  # the logit of a class without training rows


def probe_features(tokens: torch.Tensor) -> np.ndarray:
    """``tokens (N, 1 + P, D)`` (CLS first) → ``(N, 2D)`` float64: CLS and mean patch token."""
    return cls_and_mean(tokens.float()).double().numpy()


@dataclass
class LinearProbe:
    """A fitted probe: scaler, logistic regression, chosen ``C`` and temperature."""

    scaler: StandardScaler
    model: LogisticRegression
    C: float
    temperature: float

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        train: np.ndarray,
        val: np.ndarray,
        num_classes: int,
        grid: Sequence[float] = C_GRID,
    ) -> LinearProbe:
        """Fit on rows ``train`` of ``features (N, F)`` / ``labels (N,)`` for every ``C`` of
        ``grid`` (class-balanced weights), keep the best val macro-F1, fit its temperature on
        ``val``, and refit with that ``C`` on ``train`` and ``val`` together."""
        if len(train) == 0 or len(val) == 0:
            raise ValueError("the linear probe needs train rows, and val rows to choose C on")
        scaler = StandardScaler().fit(features[train])
        x_train, x_val = scaler.transform(features[train]), scaler.transform(features[val])
        best: tuple[float, float, LogisticRegression] | None = None
        for c in grid:
            model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
            model.fit(x_train, labels[train])
            pred = model.predict(x_val)
            score = macro_f1(labels[val], pred, num_classes)
            if best is None or score > best[0]:
                best = (score, c, model)
        assert best is not None
        _, c, model = best
        logits = torch.from_numpy(cls(scaler, model, c, 1.0).logits(features[val], num_classes))
        temperature = fit_temperature(logits, torch.from_numpy(labels[val]))
        both = np.concatenate([train, val])
        scaler = StandardScaler().fit(features[both])
        model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
        model.fit(scaler.transform(features[both]), labels[both])
        return cls(scaler, model, c, temperature)

    def logits(self, features: np.ndarray, num_classes: int) -> np.ndarray:
        """``(N, K)`` decision values; a class absent from training gets a very low one."""
        scores = self.model.decision_function(self.scaler.transform(features))
        if scores.ndim == 1:  # two classes: the logit of the second
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        out = np.full((len(features), num_classes), ABSENT)
        out[:, self.model.classes_] = scores
        return out

    def probabilities(self, features: np.ndarray, num_classes: int) -> np.ndarray:
        """Calibrated class probabilities ``(N, K)``."""
        z = torch.from_numpy(self.logits(features, num_classes))
        return calibrated_probabilities(z, self.temperature).numpy()
