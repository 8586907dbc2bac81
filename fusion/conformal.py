"""Prediction sets with a coverage guarantee on new places: split conformal prediction with
adaptive prediction sets (APS; Romano, Sesia & Candès 2020), calibrated on held-out *places*.

A calibrated classifier gives probabilities ``p (N, K)``. The APS score of a row with true class
``y`` is the probability mass of the classes ranked above ``y`` plus ``u * p_y`` (``u ~ U(0, 1)``,
the randomisation that makes coverage exact rather than conservative). On calibration rows
whose model never saw them, the threshold ``q`` is the ``(1 - alpha)`` quantile of their scores;
a new row's set holds the classes whose score would be at
most ``q``: every class ranked above the first one that crosses ``q``, and that one when its
randomised share stays within ``q``. Then ``P(y in set) >= 1 - alpha`` for a new row
exchangeable with the calibration rows (up to the finite-sample correction, see below).

Rows of one place are not independent, and a user predicts on new places: calibration rows are
weighted so that **every place counts once** (its rows share a weight of 1), and the threshold
is the place-weighted ``1 - alpha`` quantile. The split-conformal finite-sample correction
(``(1 - alpha)(1 + 1/n)``, counted in places) is not applied: with the 7-10 val places a
place-grouped split leaves, it would exceed 1 at 90% and put every class in every set. So the
coverage is approximate, not guaranteed, and ``fusion compare`` measures it on held-out places
(the calibration places are those that fitted the heads' weights and temperature,
:mod:`fusion.calibration`; the measured places chose nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def aps_scores(probs: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """APS conformity scores ``(N,)`` of rows with probabilities ``probs (N, K)``, true classes
    ``labels (N,)`` and randomisation ``u (N,)`` in [0, 1): the mass of the classes ranked above
    the true one plus ``u`` times its own (ties ranked by class index)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    above = np.cumsum(ranked, axis=1) - ranked  # mass strictly above each rank
    rank = np.argmax(order == labels[:, None], axis=1)
    rows = np.arange(len(labels))
    return above[rows, rank] + u * ranked[rows, rank]


def place_quantile(scores: np.ndarray, places: Sequence[object], coverage: float) -> float:
    """The smallest score whose place-weighted share of ``scores`` at or below it reaches
    ``coverage``: every place counts once, its rows sharing a weight of 1."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    names, place = np.unique(np.asarray(places, dtype=object).astype(str), return_inverse=True)
    weights = 1.0 / np.bincount(place)[place]
    order = np.argsort(scores, kind="stable")
    share = np.cumsum(weights[order]) / len(names)
    at = min(int(np.searchsorted(share, coverage - 1e-12)), len(order) - 1)
    return float(scores[order][at])


def aps_sets(probs: np.ndarray, threshold: float, u: np.ndarray) -> np.ndarray:
    """Prediction sets ``(N, K)`` bool: class ``k`` of row ``i`` is in when its APS score (as if
    it were the true class, with ``u[i]``) is at most ``threshold``. Never empty: the top class
    is always in (a set must name something to act on; coverage can only rise)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    score = np.cumsum(ranked, axis=1) - ranked + u[:, None] * ranked
    keep = score <= threshold
    keep[:, 0] = True
    sets = np.zeros_like(keep)
    np.put_along_axis(sets, order, keep, axis=1)
    return sets


def set_names(sets: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Each row's set ``(N, K)`` bool as its class names joined by ``|`` (the ``pred_set``
    column)."""
    names = np.asarray(classes)
    return ["|".join(names[member]) for member in sets]


def randomisation(n: int, seed: int = 0) -> np.ndarray:
    """The ``u (n,)`` of :func:`aps_scores` and :func:`aps_sets`, fixed by ``seed``, so a run's
    sets are reproducible."""
    return np.random.default_rng(seed).random(n)


@dataclass(frozen=True)
class ConformalCalibration:
    """APS scores of held-out calibration rows and the place of each: enough to give sets at
    any coverage (saved in checkpoints as lists)."""

    scores: np.ndarray  # (N,) float
    places: np.ndarray  # (N,) str

    @classmethod
    def fit(
        cls, probs: np.ndarray, labels: np.ndarray, places: Sequence[object], seed: int = 0
    ) -> ConformalCalibration:
        """From calibrated probabilities ``(N, K)`` of labelled held-out rows and their places."""
        scores = aps_scores(probs, labels, randomisation(len(labels), seed))
        return cls(scores, np.asarray(places, dtype=object).astype(str))

    @property
    def n_places(self) -> int:
        return len(np.unique(self.places))

    def threshold(self, coverage: float) -> float:
        return place_quantile(self.scores, self.places, coverage)

    def sets(self, probs: np.ndarray, coverage: float, seed: int = 0) -> np.ndarray:
        """Prediction sets ``(N, K)`` bool for rows with probabilities ``probs (N, K)``."""
        return aps_sets(probs, self.threshold(coverage), randomisation(len(probs), seed))

    def to_dict(self) -> dict[str, list]:
        return {"scores": self.scores.tolist(), "places": self.places.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, list]) -> ConformalCalibration:
        return cls(np.asarray(state["scores"], float), np.asarray(state["places"], dtype=object))


def coverage_table(
    sets: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> list[dict[str, object]]:
    """Empirical coverage and mean set size, overall and per true class present in ``labels``."""
    hit = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    rows: list[dict[str, object]] = [
        {"class": "all", "rows": len(labels), "coverage": hit.mean(), "mean_set_size": size.mean()}
    ]
    for k, name in enumerate(classes):
        mine = labels == k
        if mine.any():
            rows.append({"class": name, "rows": int(mine.sum()), "coverage": hit[mine].mean(),
                         "mean_set_size": size[mine].mean()})  # fmt: skip
    return rows
