"""Out-of-distribution flags: the energy score (Liu et al. 2020, "Energy-based
Out-of-distribution Detection") of the image expert, thresholded on held-out places.

A classifier's logits ``z (K,)`` give the energy ``E = -logsumexp(z)``: low on inputs like the
training data, high on inputs the classifier has no strong response to. The image expert is a
linear head on the frozen ViT's features, so its energy says how unlike the training tiles a
tile looks to the model. The threshold is the energy that a share ``1 - rate`` of the held-out
places' rows stays below (every place counting once, :func:`fusion.conformal.place_quantile`):
on new places like them, about ``rate`` of the rows are flagged; a river or a forest, unlike
every training tile, should be flagged far more often.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusion.conformal import place_quantile

FLAG_RATE = 0.05  # default share of held-out places' rows flagged


def energy(logits: np.ndarray) -> np.ndarray:
    """Energy scores ``(B,)`` of ``logits (B, K)``: ``-logsumexp``; higher = less familiar."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=-1)))


def unfamiliar(
    heads: np.ndarray, image_head: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The image expert's energy ``(B,)`` from every head's logits ``heads (B, H, K)`` and
    whether it is above ``threshold`` (:meth:`OodCalibration.threshold`): a tile unlike the
    training tiles. The one rule of ``fusion predict``'s flags and the experiments' counts."""
    score = energy(heads[:, image_head])
    return score, score > threshold


@dataclass(frozen=True)
class OodCalibration:
    """Image-expert energies of held-out rows and the place of each (saved in checkpoints)."""

    scores: np.ndarray  # (N,) float
    places: np.ndarray  # (N,) str

    @classmethod
    def fit(cls, image_logits: np.ndarray, places: Sequence[object]) -> OodCalibration:
        """From the image expert's logits ``(N, K)`` on held-out rows with a tile."""
        scores = energy(image_logits)
        return cls(scores, np.asarray(places, dtype=object).astype(str))

    def threshold(self, rate: float = FLAG_RATE) -> float:
        """The energy above which a row is flagged, so that about ``rate`` of held-out
        places' rows would be."""
        return place_quantile(self.scores, self.places, 1 - rate)

    def to_dict(self) -> dict[str, list]:
        return {"scores": self.scores.tolist(), "places": self.places.tolist()}

    @classmethod
    def from_dict(cls, state: dict[str, list]) -> OodCalibration:
        return cls(np.asarray(state["scores"], float), np.asarray(state["places"], dtype=object))
