"""LightningDataModule for paired tiles + activity windows.

It owns everything between the user's files and the model's batches: checking the manifest (all
problems reported together, before any training), the class list, the splits (the manifest's own,
a seeded stratified one, or a place-disjoint one grouped by series key; optionally inside one fold
of a place-grouped cross-validation), per-band normalisation statistics (training rows only, or
fixed), class weights, the cached series windows and the loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from fusion.data.cache import Allocate, cache_key, cached_arrays, file_fingerprint
from fusion.data.contract import DataContract
from fusion.data.datasets import PairedDataset, WithImageTokens
from fusion.data.manifest import (
    LINE,
    ClassList,
    check_manifest,
    default_series_path,
    image_paths,
    load_manifest,
    resolve_image_root,
)
from fusion.data.samples import (
    SeriesArrays,
    build_series_windows,
    common_length,
    label_indices,
    scan_tiles,
    table_reader,
    window_starts,
)
from fusion.data.series import (
    KEY_COLUMN,
    MIN_PRESENT,
    TIME_COLUMN,
    feature_count,
)
from fusion.data.splits import group_folds, group_split, single_group_labels, stratified_split
from fusion.data.tiles import BandStats
from fusion.data.tokens import Encode, cached_image_tokens
from fusion.errors import InputError, InputErrors, header_hint

SplitMode = Literal["manifest", "stratified", "place"]


class EpochShuffle(RandomSampler):
    """Shuffles epoch ``e`` by ``seed + e`` alone, whatever ran before in the process (so a run
    resumed at an epoch boundary sees the orders the uninterrupted run saw): the order of torch's
    ``DistributedSampler(seed=seed)`` on one process. Lightning calls :meth:`set_epoch` before
    every training epoch.

    A :class:`RandomSampler`, so that under DDP Lightning recognises a shuffled loader and swaps
    in its ``DistributedSampler(shuffle=True)``, which shuffles by ``seed_everything + e`` (not
    this ``seed``) and splits the rows between the processes (``use_distributed_sampler`` on).
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


class FusionDataModule(L.LightningDataModule):
    """Batches of ``image (B, C, S, S)``, ``series (B, T, F)``, ``series_mask (B, T)``, labels.

    Args:
        manifest: CSV of samples (``sample_id, image, <key_column>, start, hours[, label, split]``).
        series: long-format activity table (CSV, CSV.gz or Parquet); default: the data bundle's
            ``footfall/counts.csv.gz`` beside the manifest, if there is one.
        image_root: folder that relative ``image`` paths start from; default: the manifest's folder
            or the nearest parent in which the first image exists.
        key_column, time_column, value_columns: column names in the activity table (``key_column``
            is also the manifest's column naming each row's series).
        timezone: IANA zone for naive timestamps (required if the table or ``start`` has them).
        log1p: scale counts with ``log1p``.
        min_present: least share of present hours in a window; fewer is an input error.
        image_size: side of the square model input, pixels.
        bands: 1-based band indexes to read (default: all).
        nodata: nodata value overriding the files' own.
        band_stats: fixed per-band ``{"mean": [...], "std": [...]}`` in the tiles' units (e.g. the
            normalisation a pretrained ViT expects); default: computed on the training rows.
        classes: fixed class list (default: the sorted labels of the manifest).
        split: ``manifest`` (its ``split`` column; rows without one get a seeded stratified split),
            ``stratified`` (seeded, per label) or ``place`` (place-disjoint: whole series keys, or
            groups of them, go to train or val). ``test`` rows always stay test.
        val_fraction: share of rows (stratified) or of places per label (place) sent to val; 0
            sends none (every row not held out trains: the refit on all places).
        folds: ``K >= 2`` for place-grouped K-fold cross-validation (0: none). The places are
            dealt into ``K`` folds stratified by label (:func:`fusion.data.splits.group_folds`);
            the rows of fold ``fold`` are the test rows, and the other rows are split into train
            and val by ``split`` (``place`` or ``stratified``), so checkpoint selection and the
            temperature never see the test rows. Labels with a single place are never tested
            (:attr:`single_place_labels`). The manifest's ``split`` column is not used.
        fold: the held-out fold, ``0 .. K-1``.
        inner_folds, inner_fold: with ``split="place"`` and ``inner_folds >= 2``, the places
            that are not test rows are dealt into that many folds the same way and fold
            ``inner_fold`` is val (instead of ``val_fraction`` of the places): cross-fitting,
            where every training place is val once across ``inner_fold = 0 .. inner_folds-1``.
        seed: seed of the splits (the fold assignment: a new seed is a new repeat of the
            cross-validation) and of the training loader's shuffling (epoch ``e`` by ``seed + e``,
            see :class:`EpochShuffle`; under DDP by ``seed_everything + e``).
        groups: optional CSV mapping ``key_column`` to ``group_column`` (e.g. the footfall
            ``sensors.csv`` with ``holdout_group``: nearby sensors move together in a place split).
        batch_size, num_workers: loader settings.
        cache_dir: folder of the caches of series windows and frozen image tokens (default
            ``$FUSION_CACHE`` or ``~/.cache/fusion``; ``""`` disables both).
    """

    def __init__(
        self,
        manifest: str,
        series: str | None = None,
        image_root: str | None = None,
        key_column: str = KEY_COLUMN,
        time_column: str = TIME_COLUMN,
        value_columns: Sequence[str] = ("count",),
        timezone: str | None = None,
        log1p: bool = True,
        min_present: float = MIN_PRESENT,
        image_size: int = 224,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
        band_stats: dict[str, list[float]] | None = None,
        classes: Sequence[str] | None = None,
        split: SplitMode = "manifest",
        val_fraction: float = 0.2,
        folds: int = 0,
        fold: int = 0,
        inner_folds: int = 0,
        inner_fold: int = 0,
        seed: int = 0,
        groups: str | None = None,
        group_column: str = "holdout_group",
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.manifest_path = Path(manifest)
        self.series_path = Path(series) if series else default_series_path(self.manifest_path)
        self.image_root = Path(image_root) if image_root else None
        self.key_column = key_column
        self.value_columns = tuple(value_columns)
        self.bands = None if bands is None else list(bands)
        self.nodata = nodata
        self.image_size = image_size
        self.fixed_classes = None if classes is None else ClassList(tuple(classes))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.classes: ClassList | None = None
        self.band_stats = None if band_stats is None else BandStats.from_dict(band_stats)
        if inner_folds and not (inner_folds >= 2 and 0 <= inner_fold < inner_folds):
            raise ValueError(
                f"inner folds need inner_folds >= 2 and 0 <= inner_fold < inner_folds; got "
                f"inner_folds={inner_folds}, inner_fold={inner_fold}"
            )
        if folds and not (folds >= 2 and 0 <= fold < folds and split in ("place", "stratified")):
            raise ValueError(
                f"cross-validation needs folds >= 2, 0 <= fold < folds and split 'place' or "
                f"'stratified'; got folds={folds}, fold={fold}, split='{split}'"
            )
        self.frame: pd.DataFrame | None = None
        self.splits: np.ndarray | None = None
        self.groups: np.ndarray | None = None  # (N,) place of each row
        self.fold_of: np.ndarray | None = None  # (N,) fold of each row, -1 never tested
        # Labels with a single place: no place-disjoint split can hold them out.
        self.single_place_labels: list[str] = []
        self._datasets: dict[str, PairedDataset] = {}
        self.image_tokens: np.ndarray | None = None  # (N, 1 + G*G, D) float16, see use_image_tokens
        self._tokens_key: list[Any] | None = None
        self._encoder: tuple[Encode, Sequence[Any]] | None = None  # what use_image_tokens got
        self._tile_files: list[Any] | None = None  # file fingerprints of the rows' tiles
        self.token_seconds = 0.0  # spent computing (not loading) frozen image tokens

    # ------------------------------------------------------------------ preparation
    def setup(self, stage: str | None = None) -> None:
        if self.frame is None:
            self._prepare()

    def _prepare(self) -> None:
        frame = load_manifest(self.manifest_path, key_column=self.key_column)
        errors = check_manifest(frame, self.manifest_path, key_column=self.key_column)
        # Rows with structural problems are reported once and skipped by the later checks.
        bad = frame[LINE].isin({e.line for e in errors}).to_numpy()
        checked = frame.copy()
        checked.loc[bad, [self.key_column, "image"]] = ""
        labels = frame["label"] if "label" in frame.columns else pd.Series([""] * len(frame))
        classes = self.classes or self.fixed_classes or ClassList.from_labels(labels.tolist())
        label_idx, label_errors = label_indices(
            labels.tolist(), classes, file=self.manifest_path, lines=frame[LINE].tolist()
        )
        errors += label_errors

        splits = self._split(frame, labels.tolist())
        for i in np.flatnonzero((splits != "test") & (label_idx < 0) & (labels == "").to_numpy()):
            errors.append(
                InputError(
                    f"{splits[i]} row without a label",
                    file=self.manifest_path,
                    line=int(frame[LINE].iloc[i]),
                    field="label",
                )
            )

        series, series_errors = self._series_windows(checked)
        errors += series_errors

        root = self.image_root or resolve_image_root(self.manifest_path, frame["image"].tolist())
        paths = image_paths(checked, root)
        scan, tile_errors = scan_tiles(
            paths,
            frame[LINE].tolist(),
            splits == "train",
            manifest_path=self.manifest_path,
            bands=self.bands,
            nodata=self.nodata,
            expected_bands=len(self.band_stats) if self.band_stats else None,
        )
        errors += tile_errors
        if errors:
            raise InputErrors(errors)
        assert series is not None

        self.frame, self.splits, self.classes = frame, splits, classes
        self.band_stats = self.band_stats or scan.stats
        if self.band_stats is None:
            raise InputError(
                "no training tiles to compute normalisation statistics from",
                file=self.manifest_path,
            )
        self.labels = label_idx
        self.series = series
        self.tile_infos = scan.infos
        self.dtype = scan.dtype
        self.image_paths = paths
        for name in ("train", "val", "test", "all"):
            rows = np.flatnonzero(splits == name) if name != "all" else np.arange(len(frame))
            self._datasets[name] = PairedDataset(
                rows,
                images=paths,
                series=series,
                labels=label_idx,
                stats=self.band_stats,
                image_size=self.image_size,
                bands=self.bands,
                nodata=self.nodata,
            )

    def _split(self, frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
        hp = self.hparams
        groups = self.groups = np.array(self._groups(frame), dtype=object)
        self.single_place_labels = single_group_labels(labels, groups.tolist())
        if hp.folds:
            self.fold_of = group_folds(labels, groups.tolist(), folds=hp.folds, seed=hp.seed)
            splits = np.where(self.fold_of == hp.fold, "test", "").astype(object)
            seed: int | tuple[int, int] = (hp.seed, hp.fold)  # each fold its own inner split
            todo = splits == ""
        else:
            given = frame["split"].to_numpy(dtype=object) if "split" in frame.columns else None
            splits = np.array(given if given is not None else [""] * len(frame), dtype=object)
            seed = hp.seed
            # "manifest" fills only rows without a split; the other modes re-split all but test.
            todo = splits == "" if hp.split == "manifest" else splits != "test"
        rows = np.flatnonzero(todo)
        if len(rows) == 0:
            return splits
        if hp.val_fraction == 0:  # every row trains (a refit on all places: no val rows)
            splits[rows] = "train"
            return splits
        sub_labels = [labels[i] for i in rows]
        if hp.split == "place" and hp.inner_folds:
            inner = group_folds(sub_labels, groups[rows].tolist(), folds=hp.inner_folds, seed=seed)
            splits[rows] = np.where(inner == hp.inner_fold, "val", "train")
        elif hp.split == "place":
            splits[rows] = group_split(
                sub_labels, groups[rows].tolist(), val_fraction=hp.val_fraction, seed=seed
            )
        else:
            splits[rows] = stratified_split(sub_labels, val_fraction=hp.val_fraction, seed=seed)
        return splits

    def _groups(self, frame: pd.DataFrame) -> list[str]:
        """Place of each row: its series key (or its group, from the ``groups`` table)."""
        hp = self.hparams
        mapping: dict[str, str] = {}
        if hp.groups:
            table = pd.read_csv(hp.groups, dtype=str, keep_default_na=False)
            for column in (self.key_column, hp.group_column):
                if column not in table.columns:
                    hint = header_hint(hp.groups)
                    raise InputError(f"missing column '{column}'; {hint}", file=hp.groups)
            mapping = dict(zip(table[self.key_column], table[hp.group_column], strict=True))
        keys = frame[self.key_column].tolist()
        sample_ids = frame["sample_id"].tolist()
        return [
            mapping.get(k, k) if k else f"sample:{s}" for k, s in zip(keys, sample_ids, strict=True)
        ]

    def _series_windows(self, frame: pd.DataFrame) -> tuple[SeriesArrays | None, list[InputError]]:
        """Windows of all rows, cached on disk and memory-mapped (built once per table, rows
        and settings); ``None`` with the problems if any row is bad."""
        hp = self.hparams
        keyed = (frame[self.key_column] != "").any()
        if not keyed:
            arrays = SeriesArrays.allocate(np.zeros, len(frame), 0, len(self.value_columns))
            return arrays, []
        if self.series_path is None:
            raise InputError(
                f"the manifest names series keys ('{self.key_column}') but no series table was "
                "given (pass series=...)",
                file=self.manifest_path,
            )
        key = cache_key(
            "series-windows-v2",
            file_fingerprint(self.series_path),
            frame[[self.key_column, "start", "hours"]].to_numpy().tolist(),
            [hp.key_column, hp.time_column, list(self.value_columns)],
            [hp.timezone, hp.log1p, hp.min_present],
        )

        read_table, keys_per_pass = table_reader(
            self.series_path, key_column=hp.key_column, time_column=hp.time_column,
            value_columns=self.value_columns, timezone=hp.timezone,
        )  # fmt: skip

        def build(allocate: Allocate) -> None:
            hours = common_length(frame, self.key_column)
            starts, errors = window_starts(
                frame, manifest_path=self.manifest_path, key_column=self.key_column,
                hours=hours, timezone=hp.timezone,
                why=f"all rows must share one length (most rows have {hours})",
            )  # fmt: skip
            windows = build_series_windows(
                frame[self.key_column].tolist(), starts, hours, read_table, allocate,
                n_values=len(self.value_columns), key_column=self.key_column,
                min_present=hp.min_present, log1p=hp.log1p, keys_per_pass=keys_per_pass,
            )  # fmt: skip
            errors += windows.errors(self.manifest_path, frame[LINE].tolist())
            if errors:
                raise InputErrors(errors)

        try:
            arrays, _ = cached_arrays("series", key, build, cache_dir=hp.cache_dir)
        except InputErrors as err:
            return None, err.errors
        except InputError as err:
            return None, [err]
        return SeriesArrays.from_dict(arrays), []

    # ------------------------------------------------------------------ derived facts
    @property
    def n_features(self) -> int:
        return feature_count(self.value_columns)

    @property
    def hours(self) -> int:
        return self.series.hours

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights over the training rows, ``(K,)``; absent classes get 0."""
        assert self.classes is not None and self.splits is not None
        train = self.labels[(self.splits == "train") & (self.labels >= 0)]
        counts = np.bincount(train, minlength=len(self.classes)).astype(np.float64)
        weights = np.where(
            counts > 0, len(train) / (len(self.classes) * np.maximum(counts, 1)), 0.0
        )
        return torch.tensor(weights, dtype=torch.float32)

    def split_counts(self) -> pd.DataFrame:
        """Rows per label (index) and split (columns)."""
        assert self.frame is not None and self.classes is not None
        names = np.array([self.classes.names[i] if i >= 0 else "(none)" for i in self.labels])
        return pd.crosstab(pd.Series(names, name="label"), pd.Series(self.splits, name="split"))

    # ------------------------------------------------------------------ loaders
    def dataset(self, split: str) -> PairedDataset | WithImageTokens:
        """The rows of ``split`` (``train``, ``val``, ``test`` or ``all``); with image tokens
        attached (:meth:`use_image_tokens`) their tokens in place of the tiles."""
        self.setup()
        dataset = self._datasets[split]
        return dataset if self.image_tokens is None else WithImageTokens(dataset, self.image_tokens)

    def use_image_tokens(self, encode: Encode, identity: Sequence[Any]) -> None:
        """Serve a frozen image encoder's tokens (``image_tokens`` in every sample) instead of
        decoded tiles: ``encode`` maps normalised tiles ``(B, C, S, S)`` to tokens, computed
        once per tile and cached on disk under ``identity`` (the encoder's config and weights)
        and the tiles' normalisation and files. Time spent computing adds to
        ``token_seconds``."""
        self.setup()
        assert self.band_stats is not None
        self._encoder = (encode, identity)
        if self._tile_files is None:  # each tile's identity, read once
            self._tile_files = [
                None if p is None else file_fingerprint(p) for p in self.image_paths
            ]
        key = [*identity, [self.band_stats.to_dict(), self.bands, self.nodata], self._tile_files]
        if key == self._tokens_key:
            return  # each stage of a run (fit, test, predict) lands here: no re-encoding
        self.image_tokens = None  # encode the tiles themselves
        tokens, seconds = cached_image_tokens(
            self.dataset("all"), encode, key, cache_dir=self.hparams.cache_dir
        )
        self.image_tokens, self._tokens_key = tokens, key
        self.token_seconds += seconds

    def drop_image_tokens(self) -> None:
        """Serve decoded tiles again (for a model whose image encoder is not cached)."""
        self.image_tokens, self._tokens_key, self._encoder = None, None, None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        # Shuffled through the sampler alone (no ``shuffle=True``): Lightning reads a shuffled
        # loader off its RandomSampler. The generator only seeds workers (the tiles are read
        # without randomness).
        order = {"sampler": EpochShuffle(dataset, self.seed)} if shuffle else {"shuffle": False}
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **order,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if not len(self.dataset("test")):
            raise InputError(
                "no test rows: the val rows choose the checkpoint and the temperature, so scores "
                "on them would flatter the model. Hold out places with --data.folds K "
                "--data.fold I (the same settings for fit and test), mark rows 'test' in the "
                "manifest's split column, or use `fusion validate` for the val rows",
                file=self.manifest_path,
            )
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test rows (held-out places), for ``Trainer.predict``'s per-sample outputs."""
        return self.test_dataloader()

    # ------------------------------------------------------------------ saved with the model
    def contract(self) -> DataContract:
        """What a model trained on this data expects of its inputs (saved in checkpoints)."""
        self.setup()
        assert self.classes is not None and self.band_stats is not None
        hp = self.hparams
        return DataContract(
            classes=self.classes.names,
            band_stats=self.band_stats,
            image_size=self.image_size,
            bands=None if self.bands is None else tuple(self.bands),
            nodata=self.nodata,
            hours=self.hours,
            value_columns=self.value_columns,
            key_column=self.key_column,
            time_column=hp.time_column,
            timezone=hp.timezone,
            log1p=hp.log1p,
            min_present=hp.min_present,
            dtype=self.dtype,
            class_weights=tuple(self.class_weights().tolist()),
        )

    def state_dict(self) -> dict[str, Any]:
        return self.contract().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the classes and band statistics of a checkpoint (Lightning calls this after
        ``setup`` when testing a checkpoint: the built datasets switch to its statistics)."""
        classes = ClassList(tuple(state["classes"]))
        if self.classes is not None and self.classes != classes:
            raise InputError(
                f"the checkpoint's classes {list(classes.names)} differ from the data's "
                f"{list(self.classes.names)}: pass data.classes to fix the class list",
                file=self.manifest_path,
            )
        self.classes = classes
        self.band_stats = BandStats.from_dict(state["band_stats"])
        for dataset in self._datasets.values():
            dataset.stats = self.band_stats
        if self._encoder is not None:  # tokens of tiles normalised with the checkpoint's stats
            self.use_image_tokens(*self._encoder)
