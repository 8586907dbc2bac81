"""The datasets of the data layer.

- :class:`PairedDataset`: rows of a checked training manifest, series windows pre-built (see
  :mod:`fusion.data.samples`; memory-mapped, each read from disk on access), tiles decoded on
  access so that DataLoader workers share the work;
- :class:`WithImageTokens`: a dataset's samples with a frozen image encoder's cached tokens in
  place of the decoded tile (see :mod:`fusion.data.tokens`).

The datasets of new places (a manifest to predict, regions of a raster) are in
:mod:`fusion.data.prediction`; every one builds its samples with
:func:`fusion.data.samples.make_sample`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fusion.data.samples import Sample, SeriesArrays, make_sample, tile_tensor
from fusion.data.tiles import BandStats, read_tile


class PairedDataset(Dataset[Sample]):
    """Samples of ``rows`` of a manifest (see :func:`~fusion.data.samples.make_sample`).

    With ``load_images`` False the image is an empty tensor: the tiles are not decoded (their
    tokens are read from a cache instead, :class:`WithImageTokens`).
    """

    def __init__(
        self,
        rows: Sequence[int],
        *,
        images: Sequence[Path | None],
        series: SeriesArrays,
        labels: np.ndarray,
        stats: BandStats,
        image_size: int,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
    ) -> None:
        self.rows = list(rows)
        self.images = images
        self.series = series
        self.labels = labels
        self.stats = stats
        self.image_size = image_size
        self.bands = None if bands is None else list(bands)
        self.nodata = nodata
        self.load_images = True

    def without_images(self) -> PairedDataset:
        """The same samples with empty images (the tiles are not decoded)."""
        out = copy.copy(self)
        out.load_images = False
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> Sample:
        row = self.rows[item]
        path = self.images[row]
        if not self.load_images:
            image = torch.empty(0)
        else:
            tile = None if path is None else read_tile(path, bands=self.bands, nodata=self.nodata)
            image = tile_tensor(tile, size=self.image_size, stats=self.stats)
        features, mask = self.series.features(row)
        return make_sample(
            row,
            image=image,
            series=features,
            series_mask=mask,
            has_image=path is not None,
            has_series=bool(self.series.present[row]),
            label=int(self.labels[row]),
        )


class WithImageTokens(Dataset[Sample]):
    """``base``'s samples (images not decoded) with ``image_tokens (1 + G*G, D)`` float16: row
    ``index`` of ``tokens (N, 1 + G*G, D)`` float16, a frozen image encoder's cached output."""

    def __init__(self, base: PairedDataset, tokens: np.ndarray) -> None:
        self.base = base.without_images()
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: int) -> Sample:
        sample = self.base[item]
        sample["image_tokens"] = torch.from_numpy(np.array(self.tokens[int(sample["index"])]))
        return sample
