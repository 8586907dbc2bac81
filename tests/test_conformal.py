"""Conformal prediction sets: APS scores and sets by hand, the place-weighted and per-class
thresholds, and the coverage guarantee on simulated places, overall and per class."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.conformal import (
    ConformalCalibration,
    aps_scores,
    aps_sets,
    coverage_table,
    place_quantile,
)


def test_aps_scores_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    scores = aps_scores(probs, np.array([1, 0, 0]), np.array([0.5, 1.0, 0.25]))
    # Row 0: 0.5 above class 1, plus half its 0.3; row 1: the top class, always in a set,
    # scores 0 (not u * 0.5); row 2: 0.6 + 0.3 above class 0, plus a quarter of its 0.1.
    np.testing.assert_allclose(scores, [0.65, 0.0, 0.925])


def test_sets_hold_the_classes_whose_score_is_within_the_threshold() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.98, 0.01, 0.01]])
    u = np.array([0.5, 0.5, 0.5])
    sets = aps_sets(probs, 0.7, u)
    # Row 0: scores 0.25, 0.65, 0.9 -> {0, 1}; row 1: 0.3 (class 1), 0.75 (class 2) -> {1};
    # row 2: the top class alone.
    assert sets.tolist() == [[True, True, False], [False, True, False], [True, False, False]]
    for y in range(3):  # a class is in exactly when its own score is within the threshold
        inside = aps_scores(probs, np.full(3, y), u) <= 0.7
        assert (sets[:, y] == inside).all()
    assert aps_sets(probs, 0.0, u).sum(axis=1).tolist() == [1, 1, 1]  # never empty
    # One threshold per class: class 1 is let in at 0.65 for row 0, class 2 never.
    per_class = aps_sets(probs, np.array([0.0, 0.66, 0.0]), u)
    assert per_class.tolist() == [[True, True, False], [False, True, False], [True, False, False]]
    assert aps_sets(probs, np.array([0.0, 0.6, 1.0]), u)[0].tolist() == [True, False, True]


def test_every_place_counts_once() -> None:
    # Place A has four rows of low scores; counted by rows they would set the threshold.
    scores = np.array([0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.4])
    places = ["A", "A", "A", "A", "B", "C", "D"]
    # Four places of weight 1/4: A reaches 0.25, B 0.5, C 0.75.
    assert place_quantile(scores, places, 0.6) == pytest.approx(0.3)
    assert place_quantile(scores, places, 0.5) == pytest.approx(0.2)
    # Counted by rows (seven "places") 0.6 is reached by the fifth score.
    assert place_quantile(scores, [str(i) for i in range(7)], 0.6) == pytest.approx(0.2)
    assert place_quantile(scores, places, 0.99) == pytest.approx(0.4)


def simulate(
    rng: np.random.Generator, places: int, rows: int, k: int = 6, scale: float = 2.0
) -> tuple:
    """Calibrated probabilities (labels drawn from them), a place-level shift shared by the
    rows of a place, ``rows`` rows per place; ``scale`` sets how confident the model is."""
    logits = rng.normal(size=(places * rows, k)) * scale
    logits += np.repeat(rng.normal(size=(places, k)), rows, axis=0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels, np.repeat(np.arange(places), rows)


@pytest.mark.parametrize("scale", [2.0, 6.0])
def test_coverage_holds_on_new_places(scale: float) -> None:
    # A confident model (scale 6: top class above 0.9 on most rows) is where scoring the top
    # class as anything but 0 over-covers: a set must hold it whatever its randomised score.
    rng = np.random.default_rng(0)
    hits, sizes, per_class = [], [], []
    for trial in range(40):
        probs, labels, places = simulate(rng, places=30, rows=20, scale=scale)
        calibration = ConformalCalibration.fit(probs, labels, places, seed=trial)
        new_probs, new_labels, _ = simulate(rng, places=30, rows=20, scale=scale)
        sets = calibration.sets(new_probs, 0.9, seed=1000 + trial)
        hit = sets[np.arange(len(new_labels)), new_labels]
        hits.append(hit.mean())
        sizes.append(sets.sum(1).mean())
        per_class.append([hit[new_labels == k].mean() for k in range(6)])
    # Without the finite-sample correction, about 0.9 in expectation (30 places).
    assert 0.88 < np.mean(hits) < 0.92
    assert np.mean(per_class, axis=0).min() > 0.87  # every class, not only on average
    assert 1 < np.mean(sizes) < 6  # informative: far from every class


def test_a_hard_class_is_covered_by_its_own_threshold() -> None:
    # Class 0 is always the model's first choice, class 1 always its second with 0.4 above.
    probs = np.tile([0.6, 0.4, 0.0], (40, 1))
    labels = np.array([0] * 30 + [1] * 10)
    places = np.arange(40) // 2
    calibration = ConformalCalibration.fit(probs, labels, places)
    thresholds = calibration.thresholds(0.9)
    assert thresholds[0] == 0.0  # class 0 is the top class on all its rows
    assert 0.6 < thresholds[1] <= 1.0  # class 1's rows score 0.6 + u * 0.4
    # One threshold for all would be the 90% quantile of 75% zeros: class 1 mostly left out.
    overall = place_quantile(calibration.scores, places, 0.9)
    assert overall < thresholds[1]
    assert thresholds[2] == overall  # no calibration row of class 2: the overall quantile
    sets = calibration.sets(probs[labels == 1], 0.9)
    assert 0.8 <= sets[:, 1].mean() < 1.0


def test_saved_and_restored() -> None:
    rng = np.random.default_rng(3)
    probs, labels, places = simulate(rng, places=12, rows=5)
    calibration = ConformalCalibration.fit(probs, labels, places)
    again = ConformalCalibration.from_dict(calibration.to_dict())
    assert again is not None and again.n_places == 12
    assert (again.thresholds(0.8) == calibration.thresholds(0.8)).all()
    assert (again.sets(probs, 0.8) == calibration.sets(probs, 0.8)).all()
    # A calibration saved before sets were per class (scores only) is not reused.
    assert ConformalCalibration.from_dict({"scores": [0.1], "places": ["a"]}) is None


def test_coverage_table_per_class() -> None:
    sets = np.array([[True, False], [True, True], [False, True], [True, False]])
    table = coverage_table(sets, np.array([0, 1, 1, 1]), ["a", "b"])
    assert table[0] == {"class": "all", "rows": 4, "coverage": 0.75, "mean_set_size": 1.25}
    assert table[1]["coverage"] == 1.0 and table[2]["coverage"] == pytest.approx(2 / 3)
