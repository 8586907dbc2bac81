"""Predict on places a model has never seen, from a checkpoint alone.

Two kinds of input, one streaming loop (:func:`predict`):

- :class:`ManifestSamples`: tile + activity-window pairs listed like the training manifest (labels
  optional), with their own image folder and activity table;
- :class:`RegionSamples`: a city raster cut along region polygons, each region's series joined by
  a key column of the region layer.

The checkpoint says what the inputs must look like (:class:`ModelInputs`: classes, band statistics,
bands, tile size, window length, series settings); inputs that do not match are errors naming the
input. A sample missing one view is predicted from the other and flagged; a sample with neither is
listed as skipped, never guessed. Samples go through the model in batches, and rows are written as
they come to a temporary file that replaces the output only when every sample is done.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from fusion.calibration import calibration_errors
from fusion.data.manifest import (
    LINE,
    check_manifest,
    default_series_path,
    image_paths,
    load_manifest,
    resolve_image_root,
)
from fusion.data.mosaic import RegionRaster
from fusion.data.series import CALENDAR_FEATURES, SeriesTable, encode_window, parse_start
from fusion.data.tiles import BandStats, Tile, prepare_tile, read_tile, tile_info
from fusion.errors import InputError, InputErrors
from fusion.io import atomic_path
from fusion.maps import plot_prediction_map
from fusion.metrics import confusion_matrix, scores
from fusion.task import FusionTask, probability_columns

Sample = dict[str, Any]


# ---------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelInputs:
    """What a trained model expects of its inputs (read from its checkpoint)."""

    classes: tuple[str, ...]
    band_stats: BandStats
    image_size: int
    bands: list[int] | None
    nodata: float | None
    hours: int
    value_columns: tuple[str, ...]
    key_column: str
    time_column: str
    timezone: str | None
    log1p: bool
    min_present: float
    uses_image: bool
    uses_series: bool

    @property
    def in_chans(self) -> int:
        return len(self.band_stats)


def load_model(path: str | os.PathLike[str]) -> tuple[FusionTask, ModelInputs]:
    """A trained :class:`FusionTask` (eval mode, CPU) and its input contract.

    The file is loaded as data only (``weights_only``): a checkpoint holding pickled code is
    refused. The ViT is built without its pretrained file, whose weights are in the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", file=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load checkpoint as data: {reason}", file=path) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "data_info" not in hparams or "state_dict" not in ckpt:
        raise InputError(
            "not a fusion checkpoint (no data_info in its hyper_parameters)", file=path
        )
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    hparams["net"] = {**(hparams.get("net") or {}), "vit_weights": None}
    try:
        task = FusionTask(**hparams)
    except (TypeError, ValueError, KeyError) as err:
        raise InputError(f"cannot build the checkpoint's model: {err!r}", file=path) from err
    task.on_load_checkpoint(ckpt)
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise InputError(
            f"weights do not fit the checkpoint's own config: {err}", file=path
        ) from err
    task.eval()

    info = hparams["data_info"]
    data = ckpt.get("datamodule_hyper_parameters") or {}
    inputs = ModelInputs(
        classes=tuple(info["classes"]),
        band_stats=BandStats.from_dict(info["band_stats"]),
        image_size=int(info["image_size"]),
        bands=info.get("bands"),
        nodata=info.get("nodata"),
        hours=int(info["hours"]),
        value_columns=tuple(info["value_columns"]),
        key_column=data.get("key_column", "sensor_id"),
        time_column=data.get("time_column", "timestamp"),
        timezone=data.get("timezone"),
        log1p=bool(data.get("log1p", True)),
        min_present=float(data.get("min_present", 0.5)),
        uses_image=task.net.image_encoder is not None,
        uses_series=task.net.series_encoder is not None,
    )
    return task, inputs


# ---------------------------------------------------------------------------------- samples
class SeriesLookup:
    """Activity windows of new places: ``(T, F)`` features and ``(T,)`` mask, or why there are none.

    A key missing from the table, a window outside its span or with too few present hours means
    the place has no series (flagged in the output), not an error.
    """

    def __init__(self, table: SeriesTable | None, inputs: ModelInputs) -> None:
        self.table = table
        self.inputs = inputs
        self.n_features = len(inputs.value_columns) + len(CALENDAR_FEATURES)

    def get(self, key: str, start: pd.Timestamp | None) -> tuple[np.ndarray, np.ndarray, str]:
        """Features, mask and a note (empty when the window is usable)."""
        hours = self.inputs.hours
        features = np.zeros((hours, self.n_features), dtype=np.float32)
        mask = np.zeros(hours, dtype=bool)
        if not key or self.table is None or start is None:
            return features, mask, "no series"
        if key not in self.table:
            return features, mask, f"series key {key!r} not in the activity table"
        try:
            window = self.table.window(key, start, hours)
        except InputError as err:
            return features, mask, err.message
        if window.present_share == 0 or window.present_share < self.inputs.min_present:
            share = f"{window.present_share:.0%}"
            return features, mask, f"only {share} of the window's hours have a count"
        features, mask = encode_window(window, log1p=self.inputs.log1p)
        return features, mask, ""


def _read_series(
    path: Path | None, inputs: ModelInputs, timezone: str | None, keys: Sequence[str], where: Path
) -> SeriesTable | None:
    """The activity table if any sample names a series key; some key must be in it."""
    if not any(keys):
        return None
    if path is None:
        raise InputError(
            "samples name series keys but no activity table was given (--series)", file=where
        )
    table = SeriesTable.read(
        path,
        key_column=inputs.key_column,
        time_column=inputs.time_column,
        value_columns=inputs.value_columns,
        timezone=timezone,
    )
    if not any(k in table for k in keys if k):
        shown = ", ".join(sorted({k for k in keys if k})[:5])
        raise InputError(
            f"none of the samples' series keys ({shown}, ...) is in the activity table "
            f"(column '{inputs.key_column}')",
            file=path,
        )
    return table


def _check_bands(count: int, inputs: ModelInputs, file: Path, **where: Any) -> InputError | None:
    if count == inputs.in_chans:
        return None
    return InputError(
        f"has {count} bands, the model was trained on {inputs.in_chans}"
        + ("" if inputs.bands is None else f" (bands {inputs.bands})")
        + ": select bands with --bands",
        file=file,
        **where,
    )


def _sample(
    index: int,
    tile: Tile | None,
    share: float,
    series: tuple[np.ndarray, np.ndarray, str],
    inputs: ModelInputs,
    image_note: str,
    min_valid: float,
) -> Sample:
    """One sample; ``share`` is the part of the place whose pixels hold data (NaN: no tile).

    A tile with less than ``min_valid`` of the place is not used (nor prepared)."""
    features, mask, series_note = series
    size = inputs.image_size
    if tile is not None and share < min_valid:
        image_note = f"only {share:.0%} of the pixels have data (see --min-valid)"
        tile = None
    image = (
        torch.zeros(inputs.in_chans, size, size)
        if tile is None
        else prepare_tile(tile, size=size, stats=inputs.band_stats)
    )
    return {
        "image": image,
        "series": torch.from_numpy(features),
        "series_mask": torch.from_numpy(mask),
        "has_image": torch.tensor(tile is not None),
        "has_series": torch.tensor(not series_note),
        "valid_share": torch.tensor(share),
        "index": torch.tensor(index),
        "note": "; ".join(n for n in (image_note, series_note) if n),
    }


class ManifestSamples(Dataset[Sample]):
    """Rows of a manifest (``sample_id, image, <key>, start, hours[, label, split]``).

    Every row is checked before anything is predicted (all problems in one error): window length
    against the model's, window starts, tiles present and readable with the model's band count,
    labels among the model's classes. ``split`` keeps only the rows of that split. A tile with
    less than ``min_valid`` of its pixels holding data counts as no image.
    """

    id_column = "sample_id"

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        inputs: ModelInputs,
        *,
        series: str | os.PathLike[str] | None = None,
        image_root: str | os.PathLike[str] | None = None,
        split: str | None = None,
        timezone: str | None = None,
        min_valid: float = 0.5,
    ) -> None:
        self.path = Path(manifest)
        self.inputs = inputs
        self.min_valid = min_valid
        key = inputs.key_column
        frame = load_manifest(self.path, key_column=key)
        errors = check_manifest(frame, self.path, key_column=key, require_view=False)
        if split is not None:
            if "split" not in frame.columns:
                raise InputError("no 'split' column to select rows by", file=self.path)
            frame = frame[frame["split"] == split].reset_index(drop=True)
            if frame.empty:
                raise InputError(f"no rows with split '{split}'", file=self.path, field="split")
        self.frame = frame
        zone = timezone or inputs.timezone
        self.starts: list[pd.Timestamp | None] = []
        for row in frame.to_dict("records"):
            start = None
            if row[key] and row["hours"] != inputs.hours and row["hours"] > 0:
                errors.append(self._error(row, "hours", f"window of {row['hours']} hours; the "
                                          f"model reads {inputs.hours}-hour windows"))  # fmt: skip
            elif row[key]:
                try:
                    start = parse_start(row["start"], timezone=zone)
                except InputError as err:
                    errors.append(err.within(self.path, line=row[LINE], field="start"))
            self.starts.append(start)
        self.labels = self._labels(errors)
        root = Path(image_root) if image_root else resolve_image_root(self.path, frame["image"])
        self.images = image_paths(frame, root)
        for path, line in zip(self.images, frame[LINE], strict=True):
            if path is None:
                continue
            try:
                info = tile_info(path)
            except InputError as err:
                errors.append(err.within(self.path, line=line, field="image"))
                continue
            count = len(inputs.bands) if inputs.bands else info.count
            found = _check_bands(count, inputs, self.path, line=line, field="image")
            if found:
                errors.append(found)
        if errors:
            raise InputErrors(errors)
        series_path = Path(series) if series else default_series_path(self.path)
        table = _read_series(series_path, inputs, zone, frame[key].tolist(), self.path)
        self.lookup = SeriesLookup(table, inputs)

    def _error(self, row: dict[str, Any], field: str, message: str) -> InputError:
        return InputError(message, file=self.path, line=int(row[LINE]), field=field)

    def _labels(self, errors: list[InputError]) -> np.ndarray | None:
        """Class index per row (-1 where unlabelled), or None if the manifest has no labels."""
        if "label" not in self.frame.columns or not (self.frame["label"] != "").any():
            return None
        classes = self.inputs.classes
        labels = np.full(len(self.frame), -1, dtype=np.int64)
        for i, row in enumerate(self.frame.to_dict("records")):
            if row["label"] in classes:
                labels[i] = classes.index(row["label"])
            elif row["label"]:
                errors.append(self._error(row, "label", f"label '{row['label']}' is not one of "
                                          f"the model's classes {list(classes)}"))  # fmt: skip
        return labels

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> Sample:
        tile, share = None, float("nan")
        if self.images[i] is not None:
            try:
                tile = read_tile(self.images[i], bands=self.inputs.bands, nodata=self.inputs.nodata)
            except InputError as err:
                line = int(self.frame[LINE].iloc[i])
                raise err.within(self.path, line=line, field="image") from None
            share = float(tile.valid.mean())
        key = self.frame[self.inputs.key_column].iloc[i]
        series = self.lookup.get(key, self.starts[i])
        note = "" if tile is not None else "no image"
        return _sample(i, tile, share, series, self.inputs, note, self.min_valid)

    def describe(self) -> pd.DataFrame:
        """The columns every output row starts with."""
        columns = ["sample_id", "image", self.inputs.key_column]
        return self.frame[columns].assign(line=self.frame[LINE])


class RegionSamples(Dataset[Sample]):
    """Regions of a polygon layer over a raster, each with its series joined by ``key``.

    The raster must have the model's band count (after ``bands``) and its regions must overlap the
    raster (a CRS that places every region elsewhere is an error naming both files). A region
    outside the raster, or with less than ``min_valid`` of its area holding data, has no image
    (flagged); ``series`` + ``key`` (a column of the layer) + ``start`` give each region's
    activity window.
    """

    def __init__(
        self,
        raster: str | os.PathLike[str],
        regions: str | os.PathLike[str],
        inputs: ModelInputs,
        *,
        id_column: str = "region_id",
        layer: str | None = None,
        series: str | os.PathLike[str] | None = None,
        key: str | None = None,
        start: str | None = None,
        hours: int | None = None,
        timezone: str | None = None,
        min_valid: float = 0.5,
    ) -> None:
        self.inputs = inputs
        self.id_column = id_column
        self.min_valid = min_valid
        self.raster = RegionRaster(
            raster, regions, id_column=id_column, layer=layer, bands=inputs.bands,
            nodata=inputs.nodata,
        )  # fmt: skip
        found = _check_bands(self.raster.band_count, inputs, self.raster.raster_path)
        if found:
            raise found
        self.areas = self.raster.geometries.area.to_numpy()
        outside = self.raster.outside()
        if len(outside) == len(self.raster):
            raise InputError(
                f"no region overlaps the raster {self.raster.raster_path} "
                f"({self.raster.crs}); the regions' CRS is {self.raster.frame.crs.to_string()}: "
                "check that the layer's CRS is the one its coordinates are in",
                file=self.raster.regions_path,
            )
        self.start: pd.Timestamp | None = None
        keys: list[str] = []
        if series is not None:
            frame = self.raster.frame
            key = key or inputs.key_column
            if key not in frame.columns:
                raise InputError(
                    f"no column '{key}' to join series by (--key)",
                    file=self.raster.regions_path,
                    field=key,
                )
            if start is None:
                raise InputError("--start is needed with --series (the window's first hour)")
            if hours is not None and hours != inputs.hours:
                raise InputError(
                    f"--hours {hours}: the model reads {inputs.hours}-hour windows", field="hours"
                )
            self.start = parse_start(start, timezone=timezone or inputs.timezone)
            keys = ["" if pd.isna(k) else str(k) for k in frame[key]]
        zone = timezone or inputs.timezone
        table = _read_series(
            Path(series) if series else None, inputs, zone, keys, self.raster.regions_path
        )
        self.keys = keys or [""] * len(self.raster)
        self.lookup = SeriesLookup(table, inputs)

    def __len__(self) -> int:
        return len(self.raster)

    def __getitem__(self, i: int) -> Sample:
        tile, share, note = None, float("nan"), ""
        try:
            tile = self.raster.read(i)
        except InputError as err:
            note = err.message  # outside the raster, or only nodata pixels
        else:
            share = min(float(tile.valid.sum() * self.raster.pixel_area / self.areas[i]), 1.0)
        series = self.lookup.get(self.keys[i], self.start)
        return _sample(i, tile, share, series, self.inputs, note, self.min_valid)

    def describe(self) -> pd.DataFrame:
        return pd.DataFrame({self.id_column: self.raster.ids})


# ---------------------------------------------------------------------------------- outputs
def _status(has_image: np.ndarray, has_series: np.ndarray) -> np.ndarray:
    return np.select(
        [has_image & has_series, has_image, has_series],
        ["image+series", "image only", "series only"],
        "skipped",
    )


class _RowWriter:
    """Appends rows to a temporary CSV or GeoPackage (renamed by ``atomic_path``).

    Rows are buffered and written ``chunk`` at a time: memory stays bounded and a GeoPackage is
    not reopened for every batch.
    """

    def __init__(self, tmp: Path, geometry: gpd.GeoSeries | None, chunk: int = 4096) -> None:
        self.tmp = tmp
        self.geometry = geometry
        self.chunk = chunk
        self.first = True
        self.pending: list[tuple[pd.DataFrame, np.ndarray]] = []
        if geometry is not None:
            tmp.unlink()  # GDAL creates the GeoPackage itself

    def write(self, rows: pd.DataFrame, index: np.ndarray) -> None:
        self.pending.append((rows, index))
        if sum(len(r) for r, _ in self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = pd.concat([r for r, _ in self.pending], ignore_index=True)
        index = np.concatenate([i for _, i in self.pending])
        self.pending = []
        mode = "w" if self.first else "a"
        if self.geometry is None:
            rows.to_csv(self.tmp, mode=mode, header=self.first, index=False)
        else:
            geometry = self.geometry.iloc[index].to_numpy()
            frame = gpd.GeoDataFrame(rows, geometry=geometry, crs=self.geometry.crs)
            frame.to_file(self.tmp, layer="predictions", driver="GPKG", mode=mode)
        self.first = False


@dataclass
class Prediction:
    """What :func:`predict` did: per-row results and, with labels, the metrics."""

    output: Path
    pred: np.ndarray  # (N,) class index, -1 where skipped
    status: np.ndarray  # (N,) str
    metrics: dict[str, float] = field(default_factory=dict)
    map: Path | None = None  # the PNG map of a regions run

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.status, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _batches(samples: Dataset[Sample], batch_size: int, num_workers: int) -> Iterator[Sample]:
    loader = DataLoader(samples, batch_size=batch_size, num_workers=num_workers)
    yield from track(loader, total=len(loader), description="predicting")


def predict(
    task: FusionTask,
    inputs: ModelInputs,
    samples: ManifestSamples | RegionSamples,
    output: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "cpu",
) -> Prediction:
    """Predict every sample, writing ``output`` (``.csv`` or ``.gpkg``) only once all are done.

    Output rows: the sample's id columns, ``pred``, ``p_<class>`` (calibrated); for a model of
    both views also ``pred_image``, ``p_image_<class>``, ``pred_series``, ``p_series_<class>``
    (the model with the other view removed; empty without that view); ``has_image``,
    ``has_series``, ``valid_share`` (share of the place's pixels with data), ``status``
    (``image+series`` / ``image only`` / ``series only`` / ``skipped``) and ``note`` (why a view
    is missing). Skipped rows have no prediction.
    """
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".gpkg"):
        raise InputError("output must end in .csv or .gpkg", file=output)
    geometry = None
    if output.suffix.lower() == ".gpkg":
        if not isinstance(samples, RegionSamples):
            raise InputError("a GeoPackage needs regions (--raster, --regions)", file=output)
        geometry = samples.raster.frame.geometry
    described = samples.describe()
    classes = inputs.classes
    n = len(samples)
    pred = np.full(n, -1, dtype=np.int64)
    status = np.full(n, "skipped", dtype=object)
    logits_all = np.full((n, len(classes)), np.nan, dtype=np.float32)
    task.to(device)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(output))
        stack.enter_context(torch.inference_mode())
        writer = _RowWriter(tmp, geometry)
        for batch in _batches(samples, batch_size, num_workers):
            index = batch["index"].numpy()
            has_image = batch["has_image"].numpy() & inputs.uses_image
            has_series = batch["has_series"].numpy() & inputs.uses_series
            usable = has_image | has_series
            views = ("", "image", "series") if inputs.uses_image and inputs.uses_series else ("",)
            probs = {v: np.full((len(index), len(classes)), np.nan, np.float32) for v in views}
            if usable.any():
                keep = torch.from_numpy(usable)
                tensors = {k: v[keep].to(device) for k, v in batch.items() if k != "note"}
                out = task.predict_step(tensors)
                for view in views:
                    key = f"probs_{view}" if view else "probs"
                    probs[view][usable] = out[key].float().cpu().numpy()
                logits_all[index[usable]] = out["logits"].float().cpu().numpy()
                pred[index[usable]] = out["pred"].cpu().numpy()
            status[index] = _status(has_image, has_series)
            rows = described.iloc[index].reset_index(drop=True)
            columns = probability_columns(
                probs[""], list(classes), {v: probs[v] for v in views[1:]}
            )
            rows = pd.concat([rows, columns], axis=1)
            rows["has_image"], rows["has_series"] = has_image, has_series
            rows["valid_share"] = batch["valid_share"].numpy()
            rows["status"], rows["note"] = status[index], list(batch["note"])
            writer.write(rows, index)
        writer.flush()
    result = Prediction(output=output, pred=pred, status=status.astype(str))
    if isinstance(samples, RegionSamples):
        regions = samples.raster.frame[[samples.id_column, "geometry"]].copy()
        regions["pred"] = [classes[p] if p >= 0 else "" for p in pred]
        result.map = plot_prediction_map(
            samples.raster.raster_path,
            regions,
            classes,
            output.with_suffix(".png"),
            rgb_bands=inputs.bands[:3] if inputs.bands else None,
            nodata=inputs.nodata,
            title=f"{output.name}: predicted classes",
        )
    elif samples.labels is not None:
        result.metrics = score(logits_all, samples.labels, pred, task.temperature.item())
    return result


def score(
    logits: np.ndarray, labels: np.ndarray, pred: np.ndarray, temperature: float
) -> dict[str, float]:
    """OA, macro-F1, kappa and ECE (raw and calibrated) over labelled, predicted rows."""
    rows = (labels >= 0) & (pred >= 0)
    if not rows.any():
        return {}
    x = torch.from_numpy(logits[rows]).double()
    y = torch.from_numpy(labels[rows])
    values = scores(confusion_matrix(labels[rows], pred[rows], x.shape[1]))
    ece, ece_calibrated = calibration_errors(x, y, temperature)
    return {
        "n": int(rows.sum()),
        "OA": float(values["OA"]),
        "macro_f1": float(values["macro_f1"]),
        "kappa": float(values["kappa"]),
        "ece": ece,
        "ece_calibrated": ece_calibrated,
    }
