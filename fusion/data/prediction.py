"""Samples of new places, read the way the training samples are, under the ``flag`` policy.

Two kinds of input, one datamodule (:class:`PredictionDataModule`, whose ``predict_dataloader``
``fusion predict`` runs through the task's ``predict_step``):

- :class:`ManifestSamples`: tile + activity-window pairs listed like the training manifest (labels
  optional), with their own image folder and activity table;
- :class:`RegionSamples`: a city raster cut along region polygons, each region's series joined by
  a key column of the region layer.

The model's :class:`~fusion.data.contract.DataContract` says what the inputs must look like;
structural problems (a window of another length, a start that does not parse, tiles with another
band count or pixel type, unknown labels) are errors naming the input, all listed at once. A
sample whose tile or window cannot be used goes on with that view missing and a ``note``
(:class:`~fusion.data.samples.SeriesWindows`); one with neither view is skipped by the model.
The windows are built as the training ones are (:func:`~fusion.data.samples.build_series_windows`:
the table read in passes of keys, windows in memory-mapped scratch files), so memory follows a
pass, not the number of places.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from fusion.data.cache import Scratch
from fusion.data.contract import DataContract
from fusion.data.manifest import (
    LINE,
    ClassList,
    check_manifest,
    default_series_path,
    image_paths,
    load_manifest,
    resolve_image_root,
)
from fusion.data.mosaic import RegionRaster
from fusion.data.samples import (
    Sample,
    SeriesArrays,
    build_series_windows,
    check_bands,
    check_dtype,
    label_indices,
    make_sample,
    table_reader,
    tile_headers,
    tile_tensor,
    window_starts,
)
from fusion.data.series import parse_start
from fusion.data.tiles import MIN_VALID, Tile, read_tile
from fusion.errors import InputError, InputErrors


def _series_windows(
    path: Path | None, contract: DataContract, timezone: str | None, keys: Sequence[str],
    starts: Sequence[pd.Timestamp | None], where: Path,
) -> tuple[SeriesArrays | None, list[str]]:  # fmt: skip
    """The samples' windows (memory-mapped scratch files, built in passes of keys from the
    table's rows of those keys and hours) and a note per sample ("" when its window is used);
    None and no notes when no sample names a series. Some key must be in the table."""
    if not any(k and s is not None for k, s in zip(keys, starts, strict=True)):
        return None, ["no series"] * len(keys)
    if path is None:
        raise InputError(
            "samples name series keys but no activity table was given (--series)", file=where
        )

    read_table, keys_per_pass = table_reader(
        path, key_column=contract.key_column, time_column=contract.time_column,
        value_columns=contract.value_columns, timezone=timezone,
    )  # fmt: skip
    windows = build_series_windows(
        keys, starts, contract.hours, read_table, Scratch(), n_values=len(contract.value_columns),
        key_column=contract.key_column, min_present=contract.min_present, log1p=contract.log1p,
        keys_per_pass=keys_per_pass,
    )  # fmt: skip
    if not windows.keys_found:
        shown = ", ".join(sorted({k for k in keys if k})[:5])
        raise InputError(
            f"none of the samples' series keys ({shown}, ...) is in the activity table "
            f"(column '{contract.key_column}') within their windows",
            file=path,
        )
    return windows.arrays, windows.notes()


def _series(
    series: SeriesArrays | None, notes: list[str], i: int, contract: DataContract
) -> tuple[np.ndarray, np.ndarray, str]:
    """Sample ``i``'s features, mask and note (zeros without a series)."""
    if series is None:
        zeros = np.zeros((contract.hours, contract.n_features), np.float32)
        return zeros, np.zeros(contract.hours, bool), notes[i]
    return (*series.features(i), notes[i])


def _sample(
    index: int,
    tile: Tile | None,
    share: float,
    series: tuple[np.ndarray, np.ndarray, str],
    contract: DataContract,
    image_note: str,
    min_valid: float,
    label: int = -1,
) -> Sample:
    """One sample of a new place; ``share`` is the part of the place whose pixels hold data
    (NaN: no tile). A tile with less than ``min_valid`` of the place is not used (nor
    prepared)."""
    features, mask, series_note = series
    if tile is not None and share < min_valid:
        image_note = f"only {share:.0%} of the pixels have data (see --min-valid)"
        tile = None
    return make_sample(
        index,
        image=tile_tensor(tile, size=contract.image_size, stats=contract.band_stats),
        series=features,
        series_mask=mask,
        has_image=tile is not None,
        has_series=not series_note,
        label=label,
        valid_share=torch.tensor(share),
        note="; ".join(n for n in (image_note, series_note) if n),
    )


class ManifestSamples(Dataset[Sample]):
    """Rows of a manifest (``sample_id, image, <key>, start, hours[, label, split]``).

    Every row is checked before anything is predicted (all problems in one error): window length
    against the model's, window starts, tiles present and readable with the model's band count
    and pixel type, labels among the model's classes. ``split`` keeps only the rows of that
    split. A tile with less than ``min_valid`` of its pixels holding data counts as no image.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        contract: DataContract,
        *,
        series: str | os.PathLike[str] | None = None,
        image_root: str | os.PathLike[str] | None = None,
        split: str | None = None,
        timezone: str | None = None,
        min_valid: float = MIN_VALID,
    ) -> None:
        self.path = Path(manifest)
        self.contract = contract
        self.min_valid = min_valid
        key = contract.key_column
        frame = load_manifest(self.path, key_column=key)
        errors = check_manifest(frame, self.path, key_column=key, require_view=False)
        if split is not None:
            if "split" not in frame.columns:
                raise InputError("no 'split' column to select rows by", file=self.path)
            frame = frame[frame["split"] == split].reset_index(drop=True)
            if frame.empty:
                raise InputError(f"no rows with split '{split}'", file=self.path, field="split")
        self.frame = frame
        zone = timezone or contract.timezone
        self.starts, found = window_starts(
            frame, manifest_path=self.path, key_column=key, hours=contract.hours, timezone=zone,
            why=f"the model reads {contract.hours}-hour windows",
        )  # fmt: skip
        errors += found
        self.labels: np.ndarray | None = None
        if "label" in frame.columns and (frame["label"] != "").any():
            self.labels, found = label_indices(
                frame["label"].tolist(), ClassList(contract.classes), file=self.path,
                lines=frame[LINE].tolist(),
            )  # fmt: skip
            errors += found
        root = Path(image_root) if image_root else resolve_image_root(self.path, frame["image"])
        self.images = image_paths(frame, root)
        _, _, found = tile_headers(
            self.images, frame[LINE].tolist(), manifest_path=self.path, bands=contract.bands,
            expected_bands=contract.in_chans, expected_dtype=contract.dtype,
        )  # fmt: skip
        errors += found
        if errors:
            raise InputErrors(errors)
        series_path = Path(series) if series else default_series_path(self.path)
        self.series, self.series_notes = _series_windows(
            series_path, contract, zone, frame[key].tolist(), self.starts, self.path
        )

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> Sample:
        tile, share = None, float("nan")
        if self.images[i] is not None:
            try:
                tile = read_tile(
                    self.images[i], bands=self.contract.bands, nodata=self.contract.nodata
                )
            except InputError as err:
                line = int(self.frame[LINE].iloc[i])
                raise err.within(self.path, line=line, field="image") from None
            share = float(tile.valid.mean())
        series = _series(self.series, self.series_notes, i, self.contract)
        note = "" if tile is not None else "no image"
        label = -1 if self.labels is None else int(self.labels[i])
        return _sample(i, tile, share, series, self.contract, note, self.min_valid, label)

    def describe(self, index: np.ndarray) -> pd.DataFrame:
        """The columns the output rows of samples ``index`` start with."""
        rows = self.frame.iloc[index]
        columns = ["sample_id", "image", self.contract.key_column]
        return rows[columns].assign(line=rows[LINE]).reset_index(drop=True)


class RegionSamples(Dataset[Sample]):
    """Regions of a polygon layer over a raster, each with its series joined by ``key``.

    The raster must have the model's band count (after ``bands``) and pixel type, and its regions
    must overlap the raster (a CRS that places every region elsewhere is an error naming both
    files). A region outside the raster, with a degenerate geometry, or with less than
    ``min_valid`` of its area holding data, has no image (flagged); ``series`` + ``key`` (a
    column of the layer) + ``start`` give each region's activity window.
    """

    labels = None

    def __init__(
        self,
        raster: str | os.PathLike[str],
        regions: str | os.PathLike[str],
        contract: DataContract,
        *,
        id_column: str = "region_id",
        layer: str | None = None,
        series: str | os.PathLike[str] | None = None,
        key: str | None = None,
        start: str | None = None,
        hours: int | None = None,
        timezone: str | None = None,
        min_valid: float = MIN_VALID,
    ) -> None:
        self.contract = contract
        self.id_column = id_column
        self.min_valid = min_valid
        self.raster = RegionRaster(
            raster, regions, id_column=id_column, layer=layer, bands=contract.bands,
            nodata=contract.nodata,
        )  # fmt: skip
        path = self.raster.raster_path
        found = check_bands(
            "the raster", self.raster.band_count, contract.in_chans, contract.bands, path
        ) or check_dtype(self.raster.dtype, contract.dtype, path)
        if found:
            raise found
        unreadable = len(self.raster.outside()) + len(self.raster.degenerate())
        if unreadable == len(self.raster):
            raise InputError(
                f"no region overlaps the raster {path} ({self.raster.crs}); the regions' CRS "
                f"is {self.raster.layer_crs}: check that the layer's CRS is the one "
                "its coordinates are in",
                file=self.raster.regions_path,
            )
        zone = timezone or contract.timezone
        self.start: pd.Timestamp | None = None
        keys: list[str] = []
        if series is not None:
            key = key or contract.key_column
            if key not in self.raster.columns:
                raise InputError(
                    f"no column '{key}' to join series by (--key)",
                    file=self.raster.regions_path,
                    field=key,
                )
            if start is None:
                raise InputError("--start is needed with --series (the window's first hour)")
            if hours is not None and hours != contract.hours:
                raise InputError(
                    f"--hours {hours}: the model reads {contract.hours}-hour windows",
                    field="hours",
                )
            self.start = parse_start(start, timezone=zone)
            keys = ["" if pd.isna(k) else str(k) for k in self.raster.column(key)]
        self.keys = keys or [""] * len(self.raster)
        self.series, self.series_notes = _series_windows(
            Path(series) if series else None, contract, zone, self.keys,
            [self.start] * len(self.keys), self.raster.regions_path,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.raster)

    def __getitem__(self, i: int) -> Sample:
        tile, share = None, float("nan")
        part, j = self.raster.region(i)
        note = part.problems[j]  # e.g. a self-intersecting polygon, repaired
        try:
            tile = self.raster.read(i)
        except InputError as err:
            note = err.message  # outside the raster, a degenerate geometry, only nodata pixels
        else:  # read refuses regions without area
            area = part.areas[j]
            share = min(float(tile.valid.sum() * self.raster.pixel_area / area), 1.0)
        series = _series(self.series, self.series_notes, i, self.contract)
        return _sample(i, tile, share, series, self.contract, note, self.min_valid)

    def describe(self, index: np.ndarray) -> pd.DataFrame:
        """The columns the output rows of samples ``index`` start with."""
        return pd.DataFrame({self.id_column: self.raster.region_ids(index)})


class PredictionDataModule(L.LightningDataModule):
    """New places for ``Trainer.predict``: one of :class:`ManifestSamples` or
    :class:`RegionSamples`, in order, ``batch_size`` at a time. Each batch also holds
    ``valid_share (B,)`` and ``note`` (a list of strings: why a view is missing)."""

    def __init__(
        self, samples: ManifestSamples | RegionSamples, batch_size: int = 32, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.samples = samples
        self.batch_size = batch_size
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.samples, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False
        )

    @property
    def contract(self) -> DataContract:
        """What the samples were read for (the model's contract, with any ``--bands``)."""
        return self.samples.contract

    @property
    def labels(self) -> np.ndarray | None:
        """Class index of each sample (-1 unlabelled), or None without labels."""
        return self.samples.labels

    def describe(self, index: np.ndarray) -> pd.DataFrame:
        """The id columns of samples ``index``' output rows."""
        return self.samples.describe(index)

    def regions(self) -> Any:
        """The region layer of a raster run (None for a manifest)."""
        return self.samples.raster if isinstance(self.samples, RegionSamples) else None
