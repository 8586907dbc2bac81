"""The paired dataset: one sample = a tile tensor + an activity window + a label.

Series windows arrive pre-built (see :mod:`fusion.data.samples`); tiles are decoded on access so
that DataLoader workers share the decoding work.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fusion.data.tiles import BandStats, prepare_tile, read_tile

Sample = dict[str, torch.Tensor]


class PairedDataset(Dataset[Sample]):
    """Samples of ``rows`` of a manifest.

    Each sample is a dict: ``image (C, S, S)`` float32 normalised, ``series (T, F)`` float32,
    ``series_mask (T,)`` bool, ``has_image``/``has_series`` bool scalars (False = that view is
    missing: its tensor is all zeros and must not be read as data), ``label`` int64 (-1 if
    unlabelled) and ``index`` (the row in the manifest). With ``load_images`` False the image is
    an empty tensor: tiles are not decoded when a frozen image encoder's tokens are cached.
    """

    def __init__(
        self,
        rows: Sequence[int],
        *,
        images: Sequence[Path | None],
        series: np.ndarray,
        series_mask: np.ndarray,
        has_series: np.ndarray,
        labels: np.ndarray,
        stats: BandStats,
        image_size: int,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
    ) -> None:
        self.rows = list(rows)
        self.images = images
        self.series = series
        self.series_mask = series_mask
        self.has_series = has_series
        self.labels = labels
        self.stats = stats
        self.image_size = image_size
        self.bands = None if bands is None else list(bands)
        self.nodata = nodata
        self.load_images = True

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> Sample:
        row = self.rows[item]
        path = self.images[row]
        if not self.load_images:
            image = torch.empty(0)  # the model has this tile's tokens cached
        elif path is None:
            image = torch.zeros(len(self.stats), self.image_size, self.image_size)
        else:
            tile = read_tile(path, bands=self.bands, nodata=self.nodata)
            image = prepare_tile(tile, size=self.image_size, stats=self.stats)
        return {
            "image": image,
            "series": torch.from_numpy(self.series[row]),
            "series_mask": torch.from_numpy(self.series_mask[row]),
            "has_image": torch.tensor(path is not None),
            "has_series": torch.tensor(bool(self.has_series[row])),
            "label": torch.tensor(int(self.labels[row]), dtype=torch.long),
            "index": torch.tensor(row, dtype=torch.long),
        }
