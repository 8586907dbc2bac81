"""Prediction sets with a coverage guarantee on new places: split conformal prediction with
adaptive prediction sets (APS; Romano, Sesia & Candès 2020), class-conditional (Mondrian; Vovk
2005, Sadinle, Lei & Wasserman 2019) and calibrated on held-out *places*.

A calibrated classifier gives probabilities ``p (N, K)``. The APS score of class ``k`` for a
row is the probability mass of the classes ranked above ``k`` plus ``u * p_k`` (``u ~ U(0,
1)``, the randomisation that makes coverage exact rather than conservative), except for the
top-ranked class, whose score is 0: a set always names the top class (a user needs something
to act on), and scoring it 0 makes the calibration count exactly what the sets do (with the
plain APS score, a confident row's top class, forced in, would be covered more often than
its score says: on our held-out places that over-covered 90% sets by 3-4 points). A new row's
set holds the classes whose score is at most the threshold ``q_k`` of that class; with
``q_k`` the ``(1 - alpha)`` quantile of the scores of calibration rows of true class ``k``,
``P(y in set | y = k) >= 1 - alpha`` for a new row exchangeable with those rows (up to the
finite-sample correction, see below), so rare classes are covered as well as common ones. A
class with no calibration row takes the quantile over all rows.

Rows of one place are not independent, and a user predicts on new places: calibration rows are
weighted so that **every place counts once** (its rows share a weight of 1), and a threshold
is the place-weighted ``1 - alpha`` quantile. The split-conformal finite-sample correction
(``(1 - alpha)(1 + 1/n)``, counted in places) is not applied: with the few places of a class
it would exceed 1 at 90% and put every class in every set. So the coverage is approximate,
not guaranteed, and ``fusion compare`` measures it on held-out places. Calibration rows are
of places the model that scored them never trained on: the val places of ``fusion fit``'s
first stage, scored by that stage (also used to weigh its heads, :mod:`fusion.calibration`;
the refit trains on them and keeps this calibration), or, more of them, the out-of-fold rows of
a place-grouped cross-validation of the same setting (``fusion calibrate``; cross-conformal,
Vovk 2015): the measured places chose nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def class_scores(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """APS scores ``(N, K)`` of every class of rows with probabilities ``probs (N, K)`` and
    randomisation ``u (N,)`` in [0, 1): the mass of the classes ranked above plus ``u`` times
    its own; 0 for the top-ranked class (ties ranked by class index)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    score = np.cumsum(ranked, axis=1) - ranked + u[:, None] * ranked
    score[:, 0] = 0.0
    out = np.empty_like(score)
    np.put_along_axis(out, order, score, axis=1)
    return out


def aps_scores(probs: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The :func:`class_scores` ``(N,)`` of each row's true class ``labels (N,)``."""
    return class_scores(probs, u)[np.arange(len(labels)), labels]


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


def aps_sets(probs: np.ndarray, thresholds: float | np.ndarray, u: np.ndarray) -> np.ndarray:
    """Prediction sets ``(N, K)`` bool: class ``k`` of row ``i`` is in when its score
    (:func:`class_scores`, with ``u[i]``) is at most ``thresholds`` (one for all classes, or
    ``(K,)``, one per class). Never empty: the top class scores 0."""
    return class_scores(probs, u) <= np.asarray(thresholds, dtype=np.float64)


def set_names(sets: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Each row's set ``(N, K)`` bool as its class names joined by ``|`` (the ``pred_set``
    column)."""
    names = np.asarray(classes)
    return ["|".join(names[member]) for member in sets]


def randomisation(n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """The ``u (n,)`` of :func:`aps_scores` and :func:`aps_sets` of rows ``start .. start + n -
    1``, fixed by ``seed`` and each row's position, so a run's sets are reproducible and a
    stream of rows needs no array of all of them (``randomisation(n, start=k)`` equals
    ``randomisation(k + n)[k:]``)."""
    return np.random.Generator(np.random.PCG64(seed).advance(start)).random(n)


@dataclass(frozen=True)
class ConformalCalibration:
    """APS scores of held-out calibration rows, with the true class and place of each: enough
    to give class-conditional sets at any coverage (saved in checkpoints as lists)."""

    scores: np.ndarray  # (N,) float: the score of each row's true class
    labels: np.ndarray  # (N,) int
    places: np.ndarray  # (N,) str
    n_classes: int

    @classmethod
    def fit(
        cls, probs: np.ndarray, labels: np.ndarray, places: Sequence[object], seed: int = 0
    ) -> ConformalCalibration:
        """From calibrated probabilities ``(N, K)`` of labelled held-out rows and their places."""
        labels = np.asarray(labels, dtype=np.int64)
        scores = aps_scores(probs, labels, randomisation(len(labels), seed))
        places = np.asarray(places, dtype=object).astype(str)
        return cls(scores, labels, places, probs.shape[1])

    @property
    def n_places(self) -> int:
        return len(np.unique(self.places))

    def thresholds(self, coverage: float) -> np.ndarray:
        """The threshold ``(K,)`` of each class: the place-weighted ``coverage`` quantile of
        its calibration rows' scores, or of all rows for a class without any."""
        overall = place_quantile(self.scores, self.places, coverage)
        out = np.full(self.n_classes, overall)
        for k in np.unique(self.labels):
            mine = self.labels == k
            out[k] = place_quantile(self.scores[mine], self.places[mine], coverage)
        return out

    def sets(self, probs: np.ndarray, coverage: float, seed: int = 0) -> np.ndarray:
        """Prediction sets ``(N, K)`` bool for rows with probabilities ``probs (N, K)``."""
        return aps_sets(probs, self.thresholds(coverage), randomisation(len(probs), seed))

    def to_dict(self) -> dict[str, object]:
        return {"scores": self.scores.tolist(), "labels": self.labels.tolist(),
                "places": self.places.tolist(), "n_classes": self.n_classes}  # fmt: skip

    @classmethod
    def from_dict(cls, state: dict[str, object]) -> ConformalCalibration | None:
        """The calibration ``state`` of :meth:`to_dict`; None for one saved before sets were
        class-conditional (its scores followed another rule and cannot be reused)."""
        if "labels" not in state:
            return None
        return cls(np.asarray(state["scores"], float), np.asarray(state["labels"], np.int64),
                   np.asarray(state["places"], dtype=object), int(state["n_classes"]))  # fmt: skip


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
