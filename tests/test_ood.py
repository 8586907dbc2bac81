"""Energy-based out-of-distribution scores and their place-weighted threshold."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.ood import OodCalibration, energy, unfamiliar


def test_energy_by_hand() -> None:
    logits = np.array([[0.0, 0.0], [10.0, 0.0], [1000.0, 1000.0]])
    np.testing.assert_allclose(
        energy(logits), [-np.log(2), -(10 + np.log(1 + np.exp(-10))), -(1000 + np.log(2))]
    )  # a confident response has low energy; no overflow on large logits


def test_threshold_flags_the_share_of_held_out_places() -> None:
    rng = np.random.default_rng(0)
    places = np.repeat(np.arange(40), rng.integers(1, 30, size=40))  # uneven rows per place
    logits = rng.normal(size=(len(places), 6)) + places[:, None] % 3
    calibration = OodCalibration.fit(logits, places)
    threshold = calibration.threshold(0.1)
    flagged = calibration.scores > threshold
    per_place = np.bincount(places, weights=flagged) / np.bincount(places)
    # About 10% of every place's rows on average (each place counts once), not of all rows.
    assert per_place.mean() == pytest.approx(0.1, abs=0.03)
    again = OodCalibration.from_dict(calibration.to_dict())
    assert again.threshold(0.1) == threshold and again.threshold(0.01) > threshold


def test_unfamiliar_reads_the_image_head_only() -> None:
    heads = np.zeros((2, 2, 3))
    heads[0, 1] = [8.0, 0.0, 0.0]  # image head (1): a confident tile, low energy
    heads[1, 0] = [8.0, 0.0, 0.0]  # only the other head is confident
    score, flagged = unfamiliar(heads, image_head=1, threshold=-5.0)
    np.testing.assert_allclose(score, energy(heads[:, 1]))
    assert flagged.tolist() == [False, True]
