"""Turn checked inputs into model-ready samples: one reader for training and for prediction.

Every problem is reported at once rather than stopping at the first, under one of two policies:
``raise`` (training: every problem of every row is listed and nothing runs) or ``flag``
(prediction on new places: a window or tile that cannot be used leaves that view missing, with a
note, and the sample goes on).

- :func:`window_starts`: each row's window start, checked against the window length;
- :class:`WindowReader`: a row's checked activity window; unknown keys, windows outside the
  series, too few present hours (none at all, whatever ``min_present``) are problems;
  :func:`build_series_windows` writes every row's into :class:`SeriesArrays` (on disk when large)
  and lists the problems (:class:`SeriesWindows`: raised as errors, or kept as notes);
- :func:`tile_headers`: every tile's header; missing/unreadable files, wrong band counts
  (:func:`check_bands`) and pixel types (:func:`check_dtype`) are problems; :func:`scan_tiles`
  (training) then decodes every tile once: all-nodata tiles are errors, per-band statistics and
  the pixel type accumulate over the training rows only;
- :func:`label_indices`: labels as class indices, unknown ones errors;
- :func:`tile_tensor` and :func:`make_sample`: the model's image input and the one sample dict
  every dataset returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress, track

from fusion.data.cache import Allocate
from fusion.data.manifest import LINE, ClassList
from fusion.data.series import (
    CALENDAR_FEATURES,
    SeriesTable,
    SeriesWindow,
    calendar_features,
    parse_start,
    scale_values,
)
from fusion.data.tiles import BandStats, Tile, TileInfo, prepare_tile, read_tile, tile_info
from fusion.errors import InputError

Sample = dict[str, torch.Tensor]


def make_sample(
    index: int,
    *,
    image: torch.Tensor,
    series: np.ndarray,
    series_mask: np.ndarray,
    has_image: bool,
    has_series: bool,
    label: int = -1,
    **extra: torch.Tensor | str,
) -> Sample:
    """One sample: ``image (C, S, S)`` (empty when the model reads cached tokens), ``series (T,
    F)``, ``series_mask (T,)``, ``has_image``/``has_series`` (False = that view is missing: its
    tensor is all zeros and must not be read as data), ``label`` (-1 unlabelled) and ``index``
    (the row of its table); ``extra`` entries (e.g. a prediction's ``valid_share`` and ``note``)
    are added as given."""
    return {
        "image": image,
        "series": torch.from_numpy(series),
        "series_mask": torch.from_numpy(series_mask),
        "has_image": torch.tensor(has_image),
        "has_series": torch.tensor(has_series),
        "label": torch.tensor(label, dtype=torch.long),
        "index": torch.tensor(index, dtype=torch.long),
        **extra,
    }


def tile_tensor(tile: Tile | None, *, size: int, stats: BandStats) -> torch.Tensor:
    """A tile as the model reads it, ``(C, S, S)`` normalised by ``stats``; zeros without one."""
    if tile is None:
        return torch.zeros(len(stats), size, size)
    return prepare_tile(tile, size=size, stats=stats)


@dataclass
class SeriesArrays:
    """Windows of all rows, stored compactly (memory-mapped when cached, see
    :mod:`fusion.data.cache`): ``values (N, T, V)`` float32 scaled as the model reads them (0
    where absent, :func:`~fusion.data.series.scale_values`), ``mask (N, T)``, the local
    ``hour (N, T)`` and ``dow (N, T)`` uint8 of every slot, ``present (N,)``.

    ``present[i]`` is False where row ``i`` has no series (its window is all zeros, all masked).
    A row's model input is :meth:`features`: the calendar features are computed when read, so
    the stored window costs ``4 V + 3`` bytes an hour instead of ``4 (V + 4)``.
    """

    values: np.ndarray
    mask: np.ndarray
    hour: np.ndarray
    dow: np.ndarray
    present: np.ndarray

    NAMES = ("values", "mask", "hour", "dow", "present")

    @classmethod
    def allocate(cls, allocate: Allocate, rows: int, hours: int, n_values: int) -> SeriesArrays:
        """Zero-filled arrays of ``rows`` windows from ``allocate`` (in memory or on disk)."""
        shapes = {
            "values": ((rows, hours, n_values), np.float32), "mask": ((rows, hours), np.bool_),
            "hour": ((rows, hours), np.uint8), "dow": ((rows, hours), np.uint8),
            "present": ((rows,), np.bool_),
        }  # fmt: skip
        return cls(**{name: allocate(name, *shapes[name]) for name in cls.NAMES})

    @classmethod
    def from_dict(cls, arrays: dict[str, np.ndarray]) -> SeriesArrays:
        return cls(**{name: arrays[name] for name in cls.NAMES})

    @property
    def hours(self) -> int:
        return int(self.mask.shape[1])

    def features(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``row``'s features ``(T, V + 4)`` float32 (:func:`encode_window`'s; all zeros
        without a series) and mask ``(T,)`` bool, read from the stored arrays."""
        if not self.present[row]:
            n_features = self.values.shape[2] + len(CALENDAR_FEATURES)
            return np.zeros((self.hours, n_features), np.float32), np.zeros(self.hours, bool)
        calendar = calendar_features(self.hour[row], self.dow[row])
        return np.concatenate([self.values[row], calendar], axis=1), np.array(self.mask[row])


def window_starts(
    frame: pd.DataFrame,
    *,
    manifest_path: Path,
    key_column: str,
    hours: int,
    timezone: str | None,
    why: str,
) -> tuple[list[pd.Timestamp | None], list[InputError]]:
    """The window start of every row with a series key (None without one), and the rows whose
    length is not ``hours`` (``why`` says why it must be) or whose start does not parse."""
    starts: list[pd.Timestamp | None] = []
    errors: list[InputError] = []
    for row in frame.to_dict("records"):
        start = None
        if row[key_column] and row["hours"] != hours and row["hours"] > 0:  # 0: check_manifest's
            message = f"window of {row['hours']} hours; {why}"
            errors.append(InputError(message, file=manifest_path, line=row[LINE], field="hours"))
        elif row[key_column]:
            try:
                start = parse_start(row["start"], timezone=timezone)
            except InputError as err:
                errors.append(err.within(manifest_path, line=row[LINE], field="start"))
        starts.append(start)
    return starts, errors


@dataclass
class WindowReader:
    """Checked activity windows of ``hours`` hours from ``table``.

    A key missing from the table, a window outside its span, one without any count or with less
    than ``min_present`` of its hours present is a problem: an :class:`InputError` whose
    ``field`` says which column is at fault.
    """

    table: SeriesTable
    hours: int
    key_column: str
    min_present: float

    def window(self, key: str, start: pd.Timestamp) -> SeriesWindow:
        """The window of ``key`` from ``start``, or an :class:`InputError` if it is unusable."""
        try:
            window = self.table.window(key, start, self.hours)
        except InputError as err:
            raise InputError(err.message, field=self.key_column) from None
        if not window.present.any():
            # Even with min_present=0: an all-absent window is no series, not a series of zeros.
            raise InputError(
                "no hour of the window has a count (the series has a gap there)", field="start"
            )
        if window.present_share < self.min_present:
            raise InputError(
                f"only {window.present_share:.0%} of the window's hours have a count "
                f"(at least {self.min_present:.0%} required; see min_present)",
                field="start",
            )
        return window


KEYS_PER_PASS = 2048  # keys whose rows of an activity table are read at once, see below

ReadTable = Callable[[Collection[str], tuple[pd.Timestamp, pd.Timestamp]], SeriesTable]


def table_reader(
    path: Path, *, key_column: str, time_column: str, value_columns: Sequence[str],
    timezone: str | None,
) -> tuple[ReadTable, int | None]:  # fmt: skip
    """How :func:`build_series_windows` reads the activity table ``path``: a :data:`ReadTable`
    keeping only the keys and span asked for, and the keys per pass (:data:`KEYS_PER_PASS`; a
    CSV is parsed whole at each read, so it is read in one pass)."""

    def read_table(keys: Collection[str], span: tuple[pd.Timestamp, pd.Timestamp]) -> SeriesTable:
        return SeriesTable.read(
            path, key_column=key_column, time_column=time_column,
            value_columns=tuple(value_columns), timezone=timezone, keys=keys, span=span,
        )  # fmt: skip

    csv = path.name.lower().endswith((".csv", ".csv.gz"))
    return read_table, None if csv else KEYS_PER_PASS


@dataclass
class SeriesWindows:
    """Every row's window (:attr:`arrays`) and why a row has none: :attr:`problems` (row ->
    :class:`InputError` without a location: message and field), rows without a key or start
    have no series and no problem. :attr:`keys_found`: distinct keys the table holds rows of."""

    arrays: SeriesArrays
    problems: dict[int, InputError]
    keys_found: int

    def errors(self, file: Path, lines: Sequence[int]) -> list[InputError]:
        """Policy ``raise`` (training): each problem located at its row of ``file``."""
        return [
            InputError(err.message, file=file, line=int(lines[i]), field=err.field)
            for i, err in sorted(self.problems.items())
        ]

    def notes(self) -> list[str]:
        """Policy ``flag`` (prediction): per row, "" when its window is used, else why not."""
        present = self.arrays.present
        return [
            "" if present[i] else (self.problems[i].message if i in self.problems else "no series")
            for i in range(len(present))
        ]


def build_series_windows(
    keys: Sequence[str],
    starts: Sequence[pd.Timestamp | None],
    hours: int,
    read_table: ReadTable,
    allocate: Allocate,
    *,
    n_values: int,
    key_column: str,
    min_present: float,
    log1p: bool,
    keys_per_pass: int | None = KEYS_PER_PASS,
) -> SeriesWindows:
    """The ``hours``-hour window of every row (``keys[i]`` from ``starts[i]``; an empty key or a
    None start is no series) into arrays from ``allocate`` (:meth:`SeriesArrays.allocate`).

    The activity table is read by ``read_table(keys, span)`` in passes of ``keys_per_pass`` keys
    (None: one pass), each keeping only those keys' rows in the span of their windows, so memory
    follows a pass, not the table or the number of rows; the windows are written row by row.
    """
    arrays = SeriesArrays.allocate(allocate, len(keys), hours, n_values)
    problems: dict[int, InputError] = {}
    rows_of: dict[str, list[int]] = {}
    for i, (key, start) in enumerate(zip(keys, starts, strict=True)):
        if key and start is not None:
            rows_of.setdefault(key, []).append(i)
    ordered = list(rows_of)
    size = keys_per_pass or max(len(ordered), 1)
    found = 0
    with Progress() as bar:
        task = bar.add_task("series windows", total=len(keys))
        for first in range(0, len(ordered), size):
            chosen = ordered[first : first + size]
            rows = [i for key in chosen for i in rows_of[key]]
            begin = min(starts[i] for i in rows)  # type: ignore[type-var]
            end = max(starts[i] for i in rows) + pd.Timedelta(hours=hours - 1)  # type: ignore[operator]
            table = read_table(chosen, (begin, end))
            found += sum(key in table for key in chosen)
            reader = WindowReader(table, hours, key_column, min_present)
            for i in rows:
                try:
                    window = reader.window(keys[i], starts[i])  # type: ignore[arg-type]
                except InputError as err:
                    problems[i] = err
                    continue
                arrays.values[i] = scale_values(window, log1p=log1p)
                arrays.mask[i] = window.present
                arrays.hour[i] = window.local_hour
                arrays.dow[i] = window.local_dow
                arrays.present[i] = True
            bar.advance(task, len(rows))
            del table, reader
        bar.update(task, completed=len(keys))
    return SeriesWindows(arrays, problems, found)


def common_length(frame: pd.DataFrame, key_column: str) -> int:
    """The most common window length of the rows with a series key (0 without any)."""
    lengths = Counter(frame.loc[frame[key_column] != "", "hours"].tolist())
    return lengths.most_common(1)[0][0] if lengths else 0


def label_indices(
    labels: Sequence[str], classes: ClassList, *, file: Path, lines: Sequence[int]
) -> tuple[np.ndarray, list[InputError]]:
    """Class index of each label (-1 where empty) and an error for each unknown label."""
    indices = np.full(len(labels), -1, dtype=np.int64)
    errors: list[InputError] = []
    for i, (label, line) in enumerate(zip(labels, lines, strict=True)):
        if label in classes:
            indices[i] = classes.index(label)
        elif label:
            message = f"unknown label '{label}' (classes: {list(classes.names)})"
            errors.append(InputError(message, file=file, line=int(line), field="label"))
    return indices, errors


def check_bands(
    what: str,
    count: int,
    expected: int,
    bands: Sequence[int] | None,
    file: Path,
    **where: int | str,
) -> InputError | None:
    """An error unless ``what`` (a tile, a raster) with ``count`` bands after the ``bands``
    selection has the ``expected`` count."""
    if count == expected:
        return None
    chosen = "" if bands is None else f" (bands {list(bands)})"
    return InputError(
        f"{what} has {count} bands{chosen}, expected {expected}: select bands with --bands",
        file=file,
        **where,  # type: ignore[arg-type]
    )


def check_dtype(
    dtype: str, expected: str | None, file: Path, **where: int | str
) -> InputError | None:
    """An error unless tiles of pixel type ``dtype`` are on the training tiles' scale
    (``expected``; None: not recorded, any type)."""
    if expected is None or dtype == expected:
        return None
    return InputError(
        f"pixels are {dtype}, the model was trained on {expected} tiles: the values are on "
        f"another scale; convert the tiles to {expected} with the training tiles' range",
        file=file,
        **where,  # type: ignore[arg-type]
    )


@dataclass
class TileScan:
    """What a pass over the tiles found: per-row header info, the training tiles' band
    statistics and their (most common) pixel type."""

    infos: list[TileInfo | None]
    stats: BandStats | None
    dtype: str | None


def tile_headers(
    paths: Sequence[Path | None],
    lines: Sequence[int],
    *,
    manifest_path: Path,
    bands: Sequence[int] | None,
    expected_bands: int | None = None,
    expected_dtype: str | None = None,
) -> tuple[list[TileInfo | None], int | None, list[InputError]]:
    """Every tile's header (None where a row has no tile or a bad one), the band count expected
    after the ``bands`` selection (``expected_bands``, else the most common), and the problems:
    files missing or unreadable, another band count, another pixel type than ``expected_dtype``
    (None: any)."""
    errors: list[InputError] = []
    infos: list[TileInfo | None] = []
    for path, line in zip(paths, lines, strict=True):
        info = None
        if path is not None:
            try:
                info = tile_info(path)
            except InputError as err:
                errors.append(err.within(manifest_path, line=line, field="image"))
        infos.append(info)

    def selected(info: TileInfo) -> int:
        return len(bands) if bands else info.count

    counts = Counter(selected(i) for i in infos if i is not None)
    n_bands = expected_bands or (counts.most_common(1)[0][0] if counts else None)
    for i, info in enumerate(infos):
        if info is None or n_bands is None:
            continue
        where: dict[str, int | str] = {"line": int(lines[i]), "field": "image"}
        found = check_bands(
            f"tile {paths[i]}", selected(info), n_bands, bands, manifest_path, **where
        ) or check_dtype(info.dtype, expected_dtype, manifest_path, **where)
        if found:
            errors.append(found)
            infos[i] = None
    return infos, n_bands, errors


def scan_tiles(
    paths: Sequence[Path | None],
    lines: Sequence[int],
    train: np.ndarray,
    *,
    manifest_path: Path,
    bands: Sequence[int] | None,
    nodata: float | None,
    expected_bands: int | None = None,
) -> tuple[TileScan, list[InputError]]:
    """Check every tile (:func:`tile_headers`, then a full decode) and accumulate training band
    statistics.

    Band statistics stream over the rows where ``train`` is True, so memory stays bounded.
    """
    infos, n_bands, errors = tile_headers(
        paths, lines, manifest_path=manifest_path, bands=bands, expected_bands=expected_bands
    )

    def decoded() -> Iterator[Tile]:
        rows = [i for i, info in enumerate(infos) if info is not None]
        for i in track(rows, description="checking tiles"):
            try:
                tile = read_tile(paths[i], bands=bands, nodata=nodata)  # type: ignore[arg-type]
            except InputError as err:
                errors.append(err.within(manifest_path, line=lines[i], field="image"))
                infos[i] = None
                continue
            if train[i]:
                yield tile

    stats = BandStats.accumulate(decoded())
    dtypes = Counter(info.dtype for info, t in zip(infos, train, strict=True) if info and t)
    dtype = dtypes.most_common(1)[0][0] if dtypes else None
    return TileScan(infos=infos, stats=stats if n_bands else None, dtype=dtype), errors
