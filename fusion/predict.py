"""Predict on places a model has never seen, from a checkpoint alone.

:func:`load_model` rebuilds the task and its :class:`~fusion.data.contract.DataContract` from a
checkpoint; :func:`predict` runs a :class:`~fusion.data.prediction.PredictionDataModule`'s
``predict_dataloader`` through the task's ``predict_step`` with ``Trainer.predict``, and
:class:`RowWriter` streams each batch's rows to a temporary file that replaces the output only
when every sample is done.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import lightning as L
import numpy as np
import pandas as pd
import pyogrio
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fusion.calibration import calibration_errors
from fusion.conformal import aps_sets, randomisation, set_names
from fusion.data.contract import DataContract
from fusion.data.mosaic import CHUNK, RegionRaster
from fusion.data.prediction import PredictionDataModule
from fusion.errors import InputError
from fusion.io import atomic_path, check_replaceable
from fusion.maps import UNCERTAIN_STATUS, plot_class_raster, plot_prediction_map
from fusion.metrics import confusion_matrix, scores
from fusion.ood import unfamiliar
from fusion.speed import EXACT, Speed, apply_speed
from fusion.task import IMAGE_HEAD, VIEWS, FusionTask, probability_columns
from fusion.webmap import write_web_map


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A fusion checkpoint's contents, loaded as data only (``weights_only``): a checkpoint
    holding pickled code is refused unread; anything but a fusion checkpoint is named so."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint not found", file=path)
    if not zipfile.is_zipfile(path):
        raise InputError("not a checkpoint (a PyTorch checkpoint is a zip archive)", file=path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(
            "not a fusion checkpoint: it holds Python objects besides tensors and plain data, "
            "which are never loaded (that would run code from the file)",
            file=path,
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot read the checkpoint: {reason}", file=path) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "data_info" not in hparams or "state_dict" not in ckpt:
        raise InputError(
            "not a fusion checkpoint (no data_info in its hyper_parameters)", file=path
        )
    return ckpt


def checkpoint_contract(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> DataContract:
    """The input contract (classes, bands, window ...) of a :func:`read_checkpoint` dict."""
    try:
        return DataContract.from_dict(
            ckpt["hyper_parameters"]["data_info"], ckpt.get("datamodule_hyper_parameters")
        )
    except (TypeError, ValueError, KeyError) as err:
        raise InputError(
            f"cannot read the checkpoint's input contract: {err!r}", file=path
        ) from err


def load_model(path: str | os.PathLike[str]) -> tuple[FusionTask, DataContract]:
    """A trained :class:`FusionTask` (eval mode, CPU) and its input contract, from
    :func:`read_checkpoint`. The ViT is built without its pretrained file, whose weights are
    in the checkpoint."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    contract = checkpoint_contract(ckpt, path)
    hparams = FusionTask.known_hparams(ckpt["hyper_parameters"])
    hparams["net"] = {**(hparams.get("net") or {}), "vit_weights": None}
    hparams["data_info"] = contract.to_dict()
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
    return task.eval(), contract


UNCERTAIN = UNCERTAIN_STATUS  # the status of a prediction flagged by Flags
# Above this many regions the PNG map is rasterised and no HTML map is drawn (``_maps``).
MAP_REGIONS = 50_000
# A row's status: skipped, the views it was predicted from, or flagged.
STATUSES = ("skipped", "image+series", "image only", "series only", UNCERTAIN)


def _status(has_image: np.ndarray, has_series: np.ndarray) -> np.ndarray:
    """Each row's code in :data:`STATUSES` from the views it had."""
    views = [has_image & has_series, has_image, has_series]
    return np.select(views, [STATUSES.index(n) for n in STATUSES[1:4]], STATUSES.index("skipped"))


@dataclass(frozen=True)
class Flags:
    """When a prediction is marked ``uncertain``: the image expert's energy above ``energy``
    (head ``image_head`` of the model; None: no image expert), or a conformal set of more than
    ``max_set_size`` classes (None: sets never flag)."""

    image_head: int | None
    energy: float
    max_set_size: int | None = None


class RowWriter(BasePredictionWriter):
    """Writes each predicted batch's rows to ``tmp`` (a CSV, or with ``regions`` a GeoPackage
    layer ``predictions`` with the regions' ``geometry``, read from their file as the rows are
    written), ``chunk`` rows at a time, so memory stays bounded and a GeoPackage is not reopened
    for every batch. Keeps each of the ``n`` samples' ``pred`` and ``status`` (code in
    :data:`STATUSES`), 3 bytes a sample, and with ``keep_logits`` their logits (for scoring).

    Output rows: ``describe(index)`` (the samples' id columns), ``pred``, ``p_<class>``
    (calibrated); for a model of both views also ``pred_image``, ``p_image_<class>``,
    ``pred_series``, ``p_series_<class>`` (the model with the other view removed; empty without
    that view); ``has_image``, ``has_series`` (the views used), ``valid_share`` (share of the
    place's pixels with data), ``status`` (``image+series`` / ``image only`` / ``series only`` /
    ``skipped``) and ``note`` (why a view is missing). Skipped rows have no prediction. With
    ``thresholds`` (``(K,)``, :meth:`~fusion.conformal.ConformalCalibration.thresholds`):
    ``pred_set`` (the classes of the conformal prediction set, ``|``-separated) and
    ``set_size``. With ``flags`` (:class:`Flags`): ``image_energy`` (:mod:`fusion.ood`), and
    ``status`` ``uncertain`` (the label still written, the reason in ``note``) for a tile less
    familiar than the threshold or a set larger than ``max_set_size``.
    """

    def __init__(
        self,
        tmp: Path,
        describe: Callable[[np.ndarray], pd.DataFrame],
        n: int,
        classes: tuple[str, ...],
        regions: RegionRaster | None = None,
        chunk: int = 4096,
        thresholds: np.ndarray | None = None,
        flags: Flags | None = None,
        keep_logits: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.tmp, self.describe, self.classes = tmp, describe, classes
        self.regions, self.chunk, self.thresholds = regions, chunk, thresholds
        self.flags = flags
        self.pred = np.full(n, -1, dtype=np.int16)
        self.status = np.zeros(n, dtype=np.uint8)
        self.logits = np.full((n, len(classes)), np.nan, np.float32) if keep_logits else None
        self.first = True
        self.pending: list[tuple[pd.DataFrame, np.ndarray]] = []
        if regions is not None:
            tmp.unlink()  # GDAL creates the GeoPackage itself

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        out = {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
               for k, v in prediction.items()}  # fmt: skip
        index = out["index"]
        self.pred[index] = out["pred"]
        if self.logits is not None:
            self.logits[index] = out["logits"]
        self.status[index] = _status(out["has_image"], out["has_series"])
        views = {v: out[f"probs_{v}"] for v in VIEWS if f"probs_{v}" in out}
        rows = pd.concat(
            [self.describe(index), probability_columns(out["probs"], list(self.classes), views)],
            axis=1,
        )
        rows["has_image"], rows["has_series"] = out["has_image"], out["has_series"]
        rows["valid_share"] = batch["valid_share"].cpu().numpy()
        rows["status"], rows["note"] = self._names(index), list(batch["note"])
        if self.thresholds is not None:
            member = np.zeros(out["probs"].shape, dtype=bool)
            ok = out["pred"] >= 0
            u = randomisation(len(index), start=int(index.min()))[index - index.min()]
            member[ok] = aps_sets(out["probs"][ok], self.thresholds, u[ok])
            rows["pred_set"] = set_names(member, self.classes)
            rows["set_size"] = member.sum(axis=1)
        if self.flags is not None:
            self._flag(rows, out, index)
        self.pending.append((rows, index))
        if sum(len(r) for r, _ in self.pending) >= self.chunk:
            self.flush()

    def _names(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(STATUSES, dtype=object)[self.status[index]]

    def _flag(self, rows: pd.DataFrame, out: dict[str, np.ndarray], index: np.ndarray) -> None:
        """Mark ``rows`` uncertain where the tile is unfamiliar or the set large (notes say)."""
        flags = self.flags
        assert flags is not None
        notes = [[n] if n else [] for n in rows["note"]]
        uncertain = np.zeros(len(rows), dtype=bool)
        if flags.image_head is not None:
            has_tile = out["has_image"] & (out["pred"] >= 0)
            score, far = unfamiliar(out["heads"], flags.image_head, flags.energy)
            rows["image_energy"] = np.where(has_tile, score, np.nan)
            far &= has_tile
            for i in np.flatnonzero(far):
                notes[i].append(f"image unlike the training tiles (energy {score[i]:.2f} > "
                                f"{flags.energy:.2f})")  # fmt: skip
            uncertain |= far
        if self.thresholds is not None and flags.max_set_size is not None:
            large = rows["set_size"].to_numpy() > flags.max_set_size
            for i in np.flatnonzero(large):
                notes[i].append(f"{rows['set_size'].iloc[i]} classes in the prediction set")
            uncertain |= large
        self.status[index[uncertain]] = STATUSES.index(UNCERTAIN)
        rows["status"] = self._names(index)
        rows["note"] = ["; ".join(n) for n in notes]

    def flush(self) -> None:
        if not self.pending:
            return
        rows = pd.concat([r for r, _ in self.pending], ignore_index=True)
        index = np.concatenate([i for _, i in self.pending])
        self.pending = []
        mode = "w" if self.first else "a"
        if self.regions is None:
            rows.to_csv(self.tmp, mode=mode, header=self.first, index=False)
        else:
            lo = int(index.min())
            layer = self.regions.layer_rows(lo, int(index.max()) + 1)
            geometry = layer.geometry.to_numpy()[index - lo]
            frame = gpd.GeoDataFrame(rows, geometry=geometry, crs=layer.crs)
            frame.to_file(self.tmp, layer="predictions", driver="GPKG", mode=mode)
        self.first = False

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()


@dataclass
class Prediction:
    """What :func:`predict` did: per-row results and, with labels, the metrics."""

    output: Path
    pred: np.ndarray  # (N,) class index, -1 where skipped
    status: np.ndarray  # (N,) code in STATUSES
    metrics: dict[str, float] = field(default_factory=dict)
    map: Path | None = None  # the PNG map of a regions run
    web_map: Path | None = None  # its interactive HTML map (None: too many regions to draw)

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        counts = np.bincount(self.status, minlength=len(STATUSES))
        return {name: int(c) for name, c in zip(STATUSES, counts, strict=True) if c}


GDAL_CACHE_MB = 256


def cap_gdal_cache() -> None:
    """Cap GDAL's block cache at :data:`GDAL_CACHE_MB` unless ``GDAL_CACHEMAX`` is set (a
    user's own setting wins). GDAL keeps decoded raster blocks up to 5% of the RAM by default:
    across a city-wide raster that cache, not the model or the regions, would set the memory
    (``fusion bench --parts regions``). Call before GDAL first reads a raster."""
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))


def check_output(output: str | os.PathLike[str], regions: bool) -> Path:
    """Refuse, before any work, an output :func:`predict` could not write: not ``.csv`` or
    ``.gpkg``, a GeoPackage without regions, or a file (or a regions run's ``.png`` and
    ``.html`` maps) that cannot be replaced."""
    output = Path(output)
    if output.suffix.lower() not in (".csv", ".gpkg"):
        raise InputError("output must end in .csv or .gpkg", file=output)
    if output.suffix.lower() == ".gpkg" and not regions:
        raise InputError("a GeoPackage needs regions (--raster, --regions)", file=output)
    check_replaceable(output)
    if regions:
        check_replaceable(output.with_suffix(".png"))
        check_replaceable(output.with_suffix(".html"))
    return output


def _flags(task: FusionTask, rate: float | None, max_set_size: int | None) -> Flags | None:
    """The :class:`Flags` of ``task``'s held-out calibration (None without one)."""
    if rate is None or (task.ood is None and max_set_size is None):
        return None
    names = task.net.head_names
    image_head = names.index(IMAGE_HEAD) if task.ood is not None else None
    threshold = task.ood.threshold(rate) if task.ood is not None else float("inf")
    return Flags(image_head, threshold, max_set_size)


def _accelerator(device: str) -> dict[str, Any]:
    """``Trainer`` arguments for ``auto`` (CUDA if there is one, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    if device.startswith("cuda"):
        _, _, number = device.partition(":")
        return {"accelerator": "gpu", "devices": [int(number)] if number else 1}
    raise InputError(f"unknown device '{device}' (auto, cpu, cuda or cuda:N)", field="device")


def predict(
    task: FusionTask,
    data: PredictionDataModule,
    output: str | os.PathLike[str],
    *,
    device: str = "cpu",
    coverage: float | None = None,
    flag_rate: float | None = None,
    max_set_size: int | None = None,
    speed: Speed = EXACT,
) -> Prediction:
    """Predict every sample of ``data``, writing ``output`` (``.csv``, or ``.gpkg`` for regions)
    only once all are done (rows: :class:`RowWriter`); a regions run also draws ``.png`` and
    ``.html`` (:mod:`fusion.webmap`), a labelled manifest is scored. ``coverage`` (e.g. 0.9)
    adds conformal prediction sets calibrated on the places the model was not trained on
    (:mod:`fusion.conformal`);
    ``flag_rate`` (the share of those places' tiles that would be flagged, e.g.
    :data:`~fusion.ood.FLAG_RATE`, the command's default; None: no flags) and
    ``max_set_size`` mark predictions ``uncertain`` (:class:`Flags`). ``speed`` sets how the
    frozen ViT runs (:mod:`fusion.speed`; applied to ``task`` in place)."""
    raster = data.regions()
    output = check_output(output, regions=raster is not None)
    accelerator = _accelerator(device)
    try:
        apply_speed(task.net, speed, accelerator["accelerator"])
    except ValueError as err:
        raise InputError(str(err), field="speed") from err
    thresholds = None
    if coverage is not None:
        if task.conformal is None:
            raise InputError(
                "this model has no conformal calibration (trained before class-conditional "
                "prediction sets, or without val places): calibrate it (fusion calibrate), "
                "retrain it, or leave out --coverage",
                field="coverage",
            )
        thresholds = task.conformal.thresholds(coverage)
    regions = raster if output.suffix.lower() == ".gpkg" else None
    classes = tuple(task.classes)
    keep_logits = raster is None and data.labels is not None
    with atomic_path(output) as tmp:
        writer = RowWriter(
            tmp, data.describe, len(data.samples), classes, regions, chunk=CHUNK,
            thresholds=thresholds,
            flags=_flags(task, flag_rate, max_set_size), keep_logits=keep_logits,
        )  # fmt: skip
        trainer = L.Trainer(
            **accelerator, precision=speed.precision, logger=False,
            enable_checkpointing=False, enable_model_summary=False, callbacks=[writer],
        )  # fmt: skip
        trainer.predict(task, datamodule=data, return_predictions=False)
    result = Prediction(output=output, pred=writer.pred, status=writer.status)
    if raster is not None:
        result.map, result.web_map = _maps(output, raster, classes, data.contract)
    elif writer.logits is not None:
        result.metrics = score(writer.logits, data.labels, writer.pred, task.temperature.item())
    return result


def _maps(
    output: Path, raster: RegionRaster, classes: tuple[str, ...], contract: DataContract
) -> tuple[Path, Path | None]:
    """The PNG and HTML maps of a regions run (:mod:`fusion.maps`, :mod:`fusion.webmap`), drawn
    from the rows just written. Above :data:`MAP_REGIONS` regions the PNG's regions are
    rasterised chunk by chunk and no HTML map is written (a page holding every polygon would be
    too large for a browser; an older one of the same name is removed): the map's memory does
    not grow with the regions."""
    options = {
        "rgb_bands": contract.bands[:3] if contract.bands else None,
        "nodata": contract.nodata,
        "title": f"{output.name}: predicted classes",
    }
    png, html = output.with_suffix(".png"), output.with_suffix(".html")
    if len(raster) > MAP_REGIONS:
        chunks = _written_regions(output, raster)
        plot_class_raster(raster.raster_path, chunks, classes, png, **options)
        html.unlink(missing_ok=True)
        return png, None
    regions = pd.concat(list(_written_regions(output, raster)), ignore_index=True)
    plot_prediction_map(raster.raster_path, regions, classes, png, **options)
    write_web_map(raster.raster_path, regions, classes, html, id_column=raster.id_column,
                  **options)  # fmt: skip
    return png, html


def _written_regions(output: Path, raster: RegionRaster) -> Iterator[gpd.GeoDataFrame]:
    """The rows just written with their regions' geometry, :data:`CHUNK` at a time (a CSV's
    rows are in the regions' order: the samples are predicted in order)."""
    if output.suffix.lower() == ".gpkg":
        for start in range(0, len(raster), CHUNK):
            yield pyogrio.read_dataframe(
                output, layer="predictions", skip_features=start, max_features=CHUNK
            )
        return
    for start, rows in zip(
        range(0, len(raster), CHUNK), pd.read_csv(output, chunksize=CHUNK), strict=True
    ):
        layer = raster.layer_rows(start, start + len(rows))
        yield gpd.GeoDataFrame(rows, geometry=layer.geometry.to_numpy(), crs=layer.crs)


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
