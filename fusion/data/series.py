"""Long-format hourly activity tables (key, timestamp, values...) cut into fixed windows.

A table (``.csv``, ``.csv.gz``, ``.parquet``, or a folder of Parquet files: a partitioned dataset,
hive-style ``column=value/`` folders allowed) is read in chunks and validated with vectorized
operations (no Python loop per row). A read may keep only some keys and a span of hours: Parquet
files and their row groups that cannot hold them are skipped unread (Arrow's dataset fragments,
pruned by partition values and column statistics), and rows outside them are dropped before
their values are parsed, so memory follows the rows kept, not the table.

Each key keeps its sorted UTC epoch hours ``(n,)``, its values
``(n, F)`` float32 and the local UTC offset of every row ``(n,)`` in minutes, so a window of ``T``
consecutive absolute hours is cut with two binary searches.

Time stamps are ISO 8601 text (``2021-03-01T08:00:00+11:00``, mixed offsets allowed) or, in Parquet,
timestamp columns. Naive time stamps (no offset) need ``timezone``: they are localized in that zone,
where a wall-clock hour repeated by a DST change maps to its first (daylight-time) instant the first
time a key lists it and to its second (standard-time) instant the next time, and a wall-clock hour
skipped by a DST change is an error (shifting it would collide with the next real hour).

Values must be finite, non-negative numbers that fit in float32 (so none turns into ``inf`` on
the way to the model); there is no other upper bound (``log1p`` keeps large counts in range). An
hour without a count is left out of the table (a window marks it absent); an empty or NaN cell is
an error, not an absent hour. A second row for the same key and UTC hour is an error, even when
it repeats the first row's values. A table with no data rows is an error.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from fusion.errors import InputError, header_hint

KEY_COLUMN = "sensor_id"  # default column naming each row's series (place)
TIME_COLUMN = "timestamp"  # default column of each row's hour
MIN_PRESENT = 0.5  # default least share of a window's hours with a row, for it to be used

CALENDAR_FEATURES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")


def feature_count(value_columns: Sequence[str]) -> int:
    """Features per hour of an encoded window: the value columns, then the calendar features."""
    return len(value_columns) + len(CALENDAR_FEATURES)


_US_PER_MINUTE = 60_000_000
_US_PER_HOUR = 60 * _US_PER_MINUTE
_ISO_8601 = (
    r"^\s*\d{4}-?\d{2}-?\d{2}(?:[T ][\d:.,]*)?\s*"
    r"(?P<offset>[Zz]|[+-]\d{2}(?::?\d{2})?)?\s*$"
)
_EPOCH = pd.Timestamp(0, tz="UTC")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Cell texts read as "no value" (besides an empty cell), whatever their case.
_MISSING_TEXT = frozenset({"", "nan", "na", "n/a", "null", "none"})


@dataclass(frozen=True, eq=False)
class SeriesWindow:
    """``T`` consecutive absolute hours of one key.

    ``values`` ``(T, F)`` float32 (NaN where the table has no row), ``present`` ``(T,)`` bool,
    ``local_hour`` ``(T,)`` int wall-clock hour 0-23 and ``local_dow`` ``(T,)`` int weekday
    (Monday=0) of each slot.
    """

    values: np.ndarray
    present: np.ndarray
    local_hour: np.ndarray
    local_dow: np.ndarray

    @property
    def present_share(self) -> float:
        """Share of the ``T`` slots that have a row."""
        return float(self.present.mean())


@dataclass(frozen=True, eq=False)
class _KeySeries:
    hours: np.ndarray  # (n,) int64 UTC epoch hours, strictly increasing
    values: np.ndarray  # (n, F) float32
    offsets: np.ndarray  # (n,) int16 local UTC offset in minutes


@dataclass(frozen=True, eq=False)
class _Rows:
    """Locates data rows by file and position in it (blank lines dropped).

    CSV rows are named by file line (header = line 1), Parquet rows by 1-based row number in
    their file; ``part (n,)`` indexes ``files`` (a partitioned table has several).
    """

    files: tuple[Path, ...]
    part: np.ndarray
    positions: np.ndarray
    csv: bool

    @classmethod
    def of(cls, path: Path, positions: np.ndarray, csv: bool) -> _Rows:
        return cls((path,), np.zeros(len(positions), dtype=np.int32), positions, csv)

    @classmethod
    def concat(cls, parts: Sequence[_Rows]) -> _Rows:
        files = tuple(dict.fromkeys(f for r in parts for f in r.files))
        index = {f: i for i, f in enumerate(files)}
        part = [np.array([index[f] for f in r.files], dtype=np.int32)[r.part] for r in parts]
        positions = np.concatenate([r.positions for r in parts])
        return cls(files, np.concatenate(part), positions, parts[0].csv)

    def subset(self, keep: np.ndarray) -> _Rows:
        return _Rows(self.files, self.part[keep], self.positions[keep], self.csv)

    def name(self, index: int) -> str:
        position = int(self.positions[index])
        where = f"line {position + 2}" if self.csv else f"row {position + 1}"
        return where if len(self.files) == 1 else f"{where} of {self.files[self.part[index]]}"

    def error(self, message: str, index: int, field: str | None) -> InputError:
        position, path = int(self.positions[index]), self.files[self.part[index]]
        if self.csv:
            return InputError(message, file=path, line=position + 2, field=field)
        return InputError(message, file=path, where=f"row {position + 1}", field=field)


CHUNK_ROWS = 1_000_000


@dataclass
class _Chunk:
    """One parsed chunk of the table: codes into its own ``keys``, and per-row arrays."""

    keys: list[str]
    codes: np.ndarray
    hours: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    rows: _Rows


@dataclass
class _TimeState:
    """What parsing time stamps carries from one chunk to the next.

    ``naive``: whether the table's time stamps lack offsets (None before the first chunk);
    ``ambiguous``: (key, wall-clock microsecond) of DST-repeated hours already listed, so that a
    repeat in a later chunk maps to standard time as it would within one chunk.
    """

    naive: bool | None = None
    ambiguous: set[tuple[str, int]] = field(default_factory=set)


def _merge_keys(parts: list[_Chunk]) -> tuple[list[str], np.ndarray]:
    """The sorted keys of all chunks and every row's code into them."""
    keys = sorted(set().union(*(c.keys for c in parts)))
    index = {k: i for i, k in enumerate(keys)}
    codes = [np.array([index[k] for k in c.keys], dtype=np.int64)[c.codes] for c in parts]
    return keys, np.concatenate(codes)


class SeriesTable:
    """Hourly series of several keys (e.g. sensors), read from one long-format table."""

    def __init__(
        self,
        path: Path,
        value_columns: tuple[str, ...],
        timezone: str | None,
        series: dict[str, _KeySeries],
        span: tuple[pd.Timestamp, pd.Timestamp] | None = None,
    ) -> None:
        self._path = path
        self._value_columns = value_columns
        self._timezone = timezone
        self._series = series
        self._span = span  # the hours read, when not all of them

    @classmethod
    def read(
        cls,
        path: str | PathLike[str],
        *,
        key_column: str = KEY_COLUMN,
        time_column: str = TIME_COLUMN,
        value_columns: tuple[str, ...] = ("count",),
        timezone: str | None = None,
        chunk_rows: int = CHUNK_ROWS,
        keys: Collection[str] | None = None,
        span: tuple[pd.Timestamp, pd.Timestamp] | None = None,
    ) -> SeriesTable:
        """Read and validate a long-format table with one row per (key, hour).

        ``timezone`` (IANA name) localizes naive time stamps and, for time stamps with offsets,
        sets the zone of the local calendar (otherwise each row's own offset is used). The file
        is parsed ``chunk_rows`` rows at a time; only compact per-row arrays (key code, hour,
        offset, values: about 20 bytes a row) are kept, so memory follows the number of rows at
        that rate, not the size of the text. ``keys`` and ``span`` (first and last UTC hour, both
        included) keep only those rows: the others are neither kept nor checked.
        """
        path = Path(path)
        value_columns = tuple(value_columns)
        if not value_columns:
            raise InputError("no value columns requested", file=path)
        zone = None if timezone is None else _check_zone(timezone, path)
        wanted = None if keys is None else frozenset(keys)
        hours = None if span is None else (_epoch_hour(span[0]), _epoch_hour(span[1]))
        state = _TimeState()
        parts: list[_Chunk] = []
        columns = (key_column, time_column, value_columns)
        for frame, rows in _load(path, *columns, chunk_rows, wanted, span):
            if wanted is not None:  # before any parsing: rows of other keys are not checked
                keep = frame[key_column].astype("str").isin(wanted).to_numpy()
                frame, rows = frame[keep].reset_index(drop=True), rows.subset(keep)
            if frame.empty:
                continue
            codes, chunk_keys = _parse_keys(frame[key_column], rows, key_column)
            utc_us, offsets = _parse_times(
                frame[time_column], codes, chunk_keys, zone, rows, time_column, state
            )
            if hours is not None:
                hour = utc_us // _US_PER_HOUR
                keep = (hour >= hours[0]) & (hour <= hours[1])
                frame, rows = frame[keep].reset_index(drop=True), rows.subset(keep)
                codes, utc_us, offsets = codes[keep], utc_us[keep], offsets[keep]
                if frame.empty:
                    continue
            values = _parse_values(frame, value_columns, rows)
            parts.append(_Chunk(chunk_keys, codes, utc_us // _US_PER_HOUR, values, offsets, rows))
            del frame  # only the compact arrays outlive the chunk
        if not parts and wanted is None and span is None:
            raise InputError("table has no data rows", file=path)
        if not parts:  # none of the keys asked for, in the span: no series to read
            return cls(path, value_columns, zone, {}, span)
        keys_, codes = _merge_keys(parts)
        series = _split(
            keys_,
            codes,
            np.concatenate([c.hours for c in parts]),
            np.concatenate([c.values for c in parts]),
            np.concatenate([c.offsets for c in parts]),
            _Rows.concat([c.rows for c in parts]),
        )
        return cls(path, value_columns, zone, series, span)

    @property
    def keys(self) -> list[str]:
        """Keys in sorted order."""
        return list(self._series)

    @property
    def value_columns(self) -> tuple[str, ...]:
        return self._value_columns

    @property
    def path(self) -> Path:
        return self._path

    @property
    def timezone(self) -> str | None:
        return self._timezone

    @property
    def n_rows(self) -> int:
        """Number of (key, hour) rows."""
        return sum(len(s.hours) for s in self._series.values())

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def span(self, key: str) -> tuple[pd.Timestamp, pd.Timestamp]:
        """First and last UTC hour that ``key`` has a row for."""
        hours = self._get(key).hours
        return _hour_stamp(int(hours[0])), _hour_stamp(int(hours[-1]))

    def window(self, key: str, start: pd.Timestamp, hours: int) -> SeriesWindow:
        """``hours`` consecutive absolute hours of ``key`` from ``start`` (tz-aware, on the hour).

        Local calendar: from ``timezone`` when the table has one, otherwise from the UTC offset of
        the row nearest to each slot (ties go to the later row).
        """
        series = self._get(key)
        if hours < 1:
            raise InputError(f"window length must be at least 1 hour, got {hours}")
        first = _epoch_hour(start)
        last = first + hours - 1
        if first < series.hours[0] or last > series.hours[-1]:
            raise InputError(
                f"window {_hour_stamp(first).isoformat()} .. {_hour_stamp(last).isoformat()} "
                f"({hours} h) is outside the span of series key {key!r} in {self._path}: "
                f"{_hour_stamp(int(series.hours[0])).isoformat()} .. "
                f"{_hour_stamp(int(series.hours[-1])).isoformat()}{self._read()}"
            )
        lo, hi = (int(i) for i in np.searchsorted(series.hours, [first, last + 1]))
        slots = series.hours[lo:hi] - first
        values = np.full((hours, len(self._value_columns)), np.nan, dtype=np.float32)
        values[slots] = series.values[lo:hi]
        present = np.zeros(hours, dtype=bool)
        present[slots] = True
        slot_hours = first + np.arange(hours, dtype=np.int64)
        if self._timezone is not None:
            offsets = _zone_offsets(slot_hours * _US_PER_HOUR, self._timezone)
        else:
            offsets = _nearest_offsets(series, slot_hours, lo, hi)
        local_minutes = slot_hours * 60 + offsets
        # 1970-01-01 was a Thursday (Monday=0 -> 3).
        return SeriesWindow(
            values=values,
            present=present,
            local_hour=(local_minutes // 60) % 24,
            local_dow=(local_minutes // 1440 + 3) % 7,
        )

    def _get(self, key: str) -> _KeySeries:
        try:
            return self._series[key]
        except KeyError:
            message = f"series key {key!r} not found in {self._path}{self._read()}"
            raise InputError(message) from None

    def _read(self) -> str:
        """What of the table was read, for messages: its rows within a span, or all of it."""
        if self._span is None:
            return ""
        first, last = (t.isoformat() for t in self._span)
        return f" (rows read: {first} .. {last}, the windows asked for)"


def parse_start(value: str, *, timezone: str | None = None) -> pd.Timestamp:
    """A window start (ISO 8601, on the hour) as a UTC timestamp.

    A naive value needs ``timezone``; a wall-clock hour repeated by a DST change is taken as its
    first (daylight-time) instant, as the first such row of a table is.
    """
    try:
        stamp = pd.Timestamp(value.strip()) if re.fullmatch(_ISO_8601, value) else pd.NaT
    except ValueError:
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise InputError(f"cannot parse window start {value!r} (expected ISO 8601)")
    if stamp.tzinfo is None:
        if timezone is None:
            raise InputError(
                f"window start {value!r} has no UTC offset; pass timezone "
                "(an IANA name such as 'Australia/Melbourne')"
            )
        stamp = stamp.tz_localize(_check_zone(timezone, None), ambiguous=True, nonexistent="NaT")
        if stamp is pd.NaT:
            raise InputError(
                f"window start {value!r} does not exist in {timezone} (skipped by a DST change)"
            )
    stamp = stamp.tz_convert("UTC")
    _epoch_hour(stamp)
    return stamp


def encode_window(window: SeriesWindow, *, log1p: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of a window: features ``(T, F + 4)`` float32 and mask ``(T,)`` bool.

    Features are the values (:func:`scale_values`) followed by :func:`calendar_features`.
    """
    features = np.concatenate(
        [scale_values(window, log1p=log1p), calendar_features(window.local_hour, window.local_dow)],
        axis=1,
    )
    return features, window.present.copy()


def scale_values(window: SeriesWindow, *, log1p: bool = True) -> np.ndarray:
    """A window's values as the model reads them, ``(T, F)`` float32: ``log1p``-scaled if asked,
    absent hours 0 after scaling."""
    values = np.log1p(window.values) if log1p else window.values
    return np.where(window.present[:, None], values, 0.0).astype(np.float32)


def calendar_features(local_hour: np.ndarray, local_dow: np.ndarray) -> np.ndarray:
    """``CALENDAR_FEATURES`` of ``T`` slots, ``(T, 4)`` float32: sine and cosine of the local
    hour of day and day of week."""
    hour = 2 * np.pi * local_hour / 24
    dow = 2 * np.pi * local_dow / 7
    calendar = np.stack([np.sin(hour), np.cos(hour), np.sin(dow), np.cos(dow)], axis=1)
    return calendar.astype(np.float32)


def _check_zone(name: str, path: Path | None) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InputError(f"unknown time zone {name!r} (expected an IANA name)", file=path) from None
    return name


def _load(
    path: Path,
    key_column: str,
    time_column: str,
    value_columns: tuple[str, ...],
    chunk_rows: int = CHUNK_ROWS,
    keys: frozenset[str] | None = None,
    span: tuple[pd.Timestamp, pd.Timestamp] | None = None,
) -> Iterator[tuple[pd.DataFrame, _Rows]]:
    """The needed columns of the table, ``chunk_rows`` rows at a time, blank CSV lines dropped,
    each chunk with a locator of its rows (positions in their file). Parquet parts that cannot
    hold ``keys`` or ``span`` are skipped (:func:`_parquet_chunks`); a CSV is read whole."""
    columns = [key_column, time_column, *value_columns]
    name = path.name.lower()
    if path.is_dir() or (path.is_file() and name.endswith(".parquet")):
        yield from _parquet_chunks(path, columns, chunk_rows, keys, span)
        return
    if not path.is_file():
        raise InputError("file not found", file=path)
    if not name.endswith((".csv", ".csv.gz")):
        raise InputError(
            "unsupported table format (expected .csv, .csv.gz, .parquet or a folder of Parquet "
            "files)",
            file=path,
        )
    try:
        header = pd.read_csv(path, nrows=0).columns
    except pd.errors.EmptyDataError:
        raise InputError(
            "cannot read CSV: the file is empty (no header, no rows)", file=path
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read CSV: {error}", file=path) from None
    _require_columns(columns, header, path, csv=True)
    try:
        reader = pd.read_csv(
            path,
            usecols=columns,
            dtype={key_column: "str", time_column: "str"},
            keep_default_na=False,
            na_values={c: [""] for c in value_columns},
            skip_blank_lines=False,
            chunksize=chunk_rows,
        )
        start = 0
        for frame in reader:
            blank = (
                (frame[key_column].str.strip() == "")
                & (frame[time_column].str.strip() == "")
                & frame[list(value_columns)].isna().all(axis=1)
            ).to_numpy()
            positions = np.flatnonzero(~blank)
            if blank.any():
                frame = frame.iloc[positions].reset_index(drop=True)
            yield frame, _Rows.of(path, start + positions, csv=True)
            start += len(blank)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read CSV: {error}", file=path) from None


def _parquet_chunks(
    path: Path,
    columns: list[str],
    chunk_rows: int,
    keys: frozenset[str] | None,
    span: tuple[pd.Timestamp, pd.Timestamp] | None,
) -> Iterator[tuple[pd.DataFrame, _Rows]]:
    """Chunks of a Parquet file or of a folder of them (a partitioned dataset, hive-style
    ``column=value`` folders read as columns). Files and row groups whose partition values or
    column statistics rule out ``keys`` and ``span`` are not read (:func:`_prune`)."""
    try:
        dataset = ds.dataset(path, format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"cannot read Parquet: {error}", file=path) from None
    if not dataset.files:
        raise InputError("the folder holds no Parquet files", file=path)
    _require_columns(columns, dataset.schema.names, path)
    prune = _prune(dataset.schema, columns[0], columns[1], keys, span)
    fragments = sorted(dataset.get_fragments(filter=prune), key=lambda f: f.path)
    for fragment in fragments:
        file = Path(fragment.path)
        try:
            groups = fragment.metadata
            first_row = np.cumsum([0] + [groups.row_group(i).num_rows
                                         for i in range(groups.num_row_groups)])  # fmt: skip
            for piece in fragment.split_by_row_group(prune, schema=dataset.schema):
                start = int(first_row[piece.row_groups[0].id])
                for batch in piece.to_batches(
                    columns=columns, schema=dataset.schema, batch_size=chunk_rows
                ):
                    frame = batch.to_pandas()
                    yield frame, _Rows.of(file, start + np.arange(len(frame)), csv=False)
                    start += len(frame)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"cannot read Parquet: {error}", file=file) from None


def _prune(
    schema: pa.Schema,
    key_column: str,
    time_column: str,
    keys: frozenset[str] | None,
    span: tuple[pd.Timestamp, pd.Timestamp] | None,
) -> pc.Expression | None:
    """A filter that Arrow checks against partition values and row-group statistics: the keys
    (and their range, which statistics can rule out) for a text key column, the span for a
    time-zone-aware timestamp column. Other column types are filtered after reading."""
    terms = []
    if keys and pa.types.is_string(schema.field(key_column).type):
        field = pc.field(key_column)
        terms += [field.isin(sorted(keys)), field >= min(keys), field <= max(keys)]
    time_type = schema.field(time_column).type
    if span is not None and pa.types.is_timestamp(time_type) and time_type.tz is not None:
        field = pc.field(time_column)
        terms += [field >= span[0].to_pydatetime(), field <= span[1].to_pydatetime()]
    expression = None
    for term in terms:
        expression = term if expression is None else expression & term
    return expression


def _require_columns(
    columns: list[str], available: Iterable[str], path: Path, *, csv: bool = False
) -> None:
    """Raise for the first of ``columns`` not ``available``; for a CSV the message shows the
    header line and a delimiter other than ',' it seems to use (:func:`header_hint`)."""
    names = set(available)
    for column in columns:
        if column not in names:
            message = "column missing from the table header"
            hint = header_hint(path) if csv else ""
            if hint:
                message += f"; {hint}"
            raise InputError(message, file=path, field=column)


def _show(column: pd.Series, index: int) -> str:
    """A cell quoted for a message."""
    return repr(str(column.iloc[index]))


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _parse_keys(column: pd.Series, rows: _Rows, field: str) -> tuple[np.ndarray, list[str]]:
    """Key codes ``(n,)`` into the sorted list of distinct keys."""
    text = column.astype("str")
    bad = _first((text.isna() | (text.str.strip() == "")).to_numpy())
    if bad is not None:
        raise rows.error("missing key", bad, field)
    codes, uniques = pd.factorize(text, sort=True)
    return codes.astype(np.int64), [str(k) for k in uniques]


def _parse_times(
    column: pd.Series,
    codes: np.ndarray,
    keys: list[str],
    zone: str | None,
    rows: _Rows,
    field: str,
    state: _TimeState,
) -> tuple[np.ndarray, np.ndarray]:
    """UTC epoch microseconds ``(n,)`` int64 and local UTC offset minutes ``(n,)`` int16.

    ``state`` carries what earlier chunks of the table decided (see :class:`_TimeState`)."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        missing = _first(column.isna().to_numpy())
        if missing is not None:
            raise rows.error("missing timestamp", missing, field)
        utc_us = pd.DatetimeIndex(column).as_unit("us").asi8
        offsets = _zone_offsets(utc_us, zone or column.dt.tz)
    elif pd.api.types.is_datetime64_dtype(column.dtype):
        utc_us, offsets = _localize(
            pd.DatetimeIndex(column), column, codes, keys, zone, rows, field, state
        )
    else:
        text = column.astype("str")
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        strings = pa.array(text.array)
        if isinstance(strings, pa.ChunkedArray):
            strings = strings.combine_chunks()
        match = pc.extract_regex(strings, _ISO_8601)
        bad = _first(parsed.isna().to_numpy() | ~match.is_valid().to_numpy(zero_copy_only=False))
        if bad is not None:
            value = text.iloc[bad]
            message = (
                "missing timestamp"
                if pd.isna(value) or not value.strip()
                else f"cannot parse timestamp {_show(text, bad)} (expected ISO 8601)"
            )
            raise rows.error(message, bad, field)
        encoded = pc.struct_field(match, [0]).dictionary_encode()
        labels = encoded.dictionary.to_pylist()
        label_of_row = encoded.indices.to_numpy(zero_copy_only=False)
        naive = np.isin(label_of_row, [i for i, label in enumerate(labels) if label == ""])
        if state.naive is not None and naive.all() != state.naive:
            if naive.all():
                at, what = 0, "no UTC offset while earlier ones have one"
            else:
                at = int(np.flatnonzero(~naive)[0])
                what = "a UTC offset while earlier ones have none"
            raise rows.error(f"timestamp {_show(text, at)} has {what}", at, field)
        if naive.all():
            wall = pd.DatetimeIndex(parsed).tz_localize(None)
            utc_us, offsets = _localize(wall, text, codes, keys, zone, rows, field, state)
        elif naive.any():
            first_naive = int(np.flatnonzero(naive)[0])
            raise rows.error(
                f"timestamp {_show(text, first_naive)} has no UTC offset while others have one",
                first_naive,
                field,
            )
        else:
            state.naive = False
            utc_us = pd.DatetimeIndex(parsed).as_unit("us").asi8
            if zone is not None:
                offsets = _zone_offsets(utc_us, zone)
            else:
                minutes = np.array([_offset_minutes(label) for label in labels], dtype=np.int16)
                offsets = minutes[label_of_row]
    off_hour = _first(utc_us % _US_PER_HOUR != 0)
    if off_hour is not None:
        raise rows.error(
            f"timestamp {_show(column, off_hour)} is not on a whole UTC hour "
            "(rows are hourly slots)",
            off_hour,
            field,
        )
    return utc_us, offsets


def _localize(
    wall: pd.DatetimeIndex,
    column: pd.Series,
    codes: np.ndarray,
    keys: list[str],
    zone: str | None,
    rows: _Rows,
    field: str,
    state: _TimeState,
) -> tuple[np.ndarray, np.ndarray]:
    """UTC microseconds and offset minutes of naive wall-clock times in ``zone``.

    DST rules: see the module docstring; a repeated hour's earlier listings may lie in earlier
    chunks (``state.ambiguous``).
    """
    state.naive = True
    missing = _first(wall.isna())
    if missing is not None:
        raise rows.error("missing timestamp", missing, field)
    if zone is None:
        raise rows.error(
            f"timestamp {_show(column, 0)} has no UTC offset; pass timezone "
            "(an IANA name such as 'Australia/Melbourne')",
            0,
            field,
        )
    n = len(wall)
    daylight = wall.tz_localize(zone, ambiguous=np.ones(n, dtype=bool), nonexistent="NaT")
    skipped = _first(daylight.isna())
    if skipped is not None:
        raise rows.error(
            f"local time {_show(column, skipped)} does not exist in {zone} "
            "(skipped by a DST change)",
            skipped,
            field,
        )
    standard = wall.tz_localize(zone, ambiguous=np.zeros(n, dtype=bool), nonexistent="NaT")
    wall_us = wall.as_unit("us").asi8
    utc_us = daylight.as_unit("us").asi8.copy()
    ambiguous = np.flatnonzero(utc_us != standard.as_unit("us").asi8)
    if len(ambiguous):
        seen = pd.DataFrame({"key": codes[ambiguous], "wall": wall_us[ambiguous]})
        later = seen.groupby(["key", "wall"]).cumcount().to_numpy() > 0
        pairs = [(keys[c], int(w)) for c, w in zip(seen["key"], seen["wall"], strict=True)]
        later |= np.array([pair in state.ambiguous for pair in pairs])
        state.ambiguous.update(pairs)
        repeat = ambiguous[later]
        utc_us[repeat] = standard.as_unit("us").asi8[repeat]
    return utc_us, ((wall_us - utc_us) // _US_PER_MINUTE).astype(np.int16)


def _offset_minutes(text: str) -> int:
    """``Z``, ``+HH``, ``+HHMM`` or ``+HH:MM`` as signed minutes."""
    if text in ("Z", "z"):
        return 0
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + int(digits[2:] or 0)
    return -minutes if text[0] == "-" else minutes


def _zone_offsets(utc_us: np.ndarray, zone: object) -> np.ndarray:
    """Local UTC offset minutes ``(n,)`` int16 of UTC microseconds ``(n,)`` in ``zone``."""
    utc = pd.DatetimeIndex(utc_us.astype("datetime64[us]"))
    local_us = utc.tz_localize("UTC").tz_convert(zone).tz_localize(None).as_unit("us").asi8
    return ((local_us - utc_us) // _US_PER_MINUTE).astype(np.int16)


def _parse_values(frame: pd.DataFrame, value_columns: tuple[str, ...], rows: _Rows) -> np.ndarray:
    """Values ``(n, F)`` float32; each must be a finite non-negative number within float32."""
    out = np.empty((len(frame), len(value_columns)), dtype=np.float32)
    for j, name in enumerate(value_columns):
        column = frame[name]
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = _first(~np.isfinite(numbers) | (numbers < 0) | (numbers > _FLOAT32_MAX))
        if bad is not None:
            cell = column.iloc[bad]
            if pd.isna(cell) or str(cell).strip().lower() in _MISSING_TEXT:
                shown = "empty or NaN" if pd.isna(cell) else _show(column, bad)
                message = (
                    f"missing value ({shown}): leave out the row of an hour without a count "
                    "(absent hours are masked)"
                )
            elif np.isfinite(numbers[bad]) and numbers[bad] > _FLOAT32_MAX:
                message = (
                    f"value {_show(column, bad)} is too large "
                    f"(values must be at most {_FLOAT32_MAX:.3g}, the float32 limit)"
                )
            else:
                message = f"value {_show(column, bad)} is not a finite non-negative number"
            raise rows.error(message, bad, name)
        out[:, j] = numbers
    return out


def _split(
    keys: list[str],
    codes: np.ndarray,
    hours: np.ndarray,
    values: np.ndarray,
    offsets: np.ndarray,
    rows: _Rows,
) -> dict[str, _KeySeries]:
    """Per-key series sorted by hour; a second row for a (key, hour) is an error."""
    order = np.lexsort((hours, codes))
    codes, hours = codes[order], hours[order]
    repeated = np.flatnonzero((codes[1:] == codes[:-1]) & (hours[1:] == hours[:-1]))
    if len(repeated):
        # The sort is stable, so the later of two equal rows is the duplicate.
        k = int(np.argmin(order[repeated + 1]))
        duplicate, original = int(order[repeated[k] + 1]), int(order[repeated[k]])
        raise rows.error(
            f"duplicate hour {_hour_stamp(int(hours[repeated[k]])).isoformat()} for key "
            f"{keys[codes[repeated[k]]]!r} (first given on {rows.name(original)})",
            duplicate,
            None,
        )
    bounds = np.flatnonzero(np.diff(codes)) + 1
    values, offsets = values[order], offsets[order]
    return {
        keys[int(c[0])]: _KeySeries(h, v, o)
        for c, h, v, o in zip(
            np.split(codes, bounds),
            np.split(hours, bounds),
            np.split(values, bounds),
            np.split(offsets, bounds),
            strict=True,
        )
    }


def _nearest_offsets(series: _KeySeries, slot_hours: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Offset minutes ``(T,)`` of the row nearest each slot; rows ``lo-1 .. hi`` bracket them."""
    a, b = max(lo - 1, 0), min(hi + 1, len(series.hours))
    near = series.hours[a:b]
    after = np.searchsorted(near, slot_hours)
    before = np.maximum(after - 1, 0)
    after = np.minimum(after, len(near) - 1)
    take_before = slot_hours - near[before] < near[after] - slot_hours
    return series.offsets[a:b][np.where(take_before, before, after)].astype(np.int64)


def _epoch_hour(start: pd.Timestamp) -> int:
    if start.tzinfo is None:
        raise InputError(f"window start {start} has no UTC offset")
    hours, rest = divmod(start - _EPOCH, pd.Timedelta(hours=1))
    if rest:
        raise InputError(f"window start {start.isoformat()} is not on a whole UTC hour")
    return int(hours)


def _hour_stamp(hour: int) -> pd.Timestamp:
    return pd.Timestamp(hour * 3600, unit="s", tz="UTC")
