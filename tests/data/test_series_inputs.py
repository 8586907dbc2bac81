"""Odd and damaged series tables cut from the real footfall counts: each a clear error or a
documented, tested handling (see the module docstring of ``fusion.data.series``).

- an empty/NaN count is an error (leave the row out: absent hours are masked), never a 0;
- a count above the float32 limit is an error (it would become ``inf``); smaller huge counts
  (e.g. 1e12) are kept as they are and stay finite through ``log1p`` and standardisation;
- a naive time stamp repeated by a DST fall-back maps to daylight time the first time a key lists
  it and to standard time the second; a third listing is a duplicate hour;
- a window with no present hour is kept by ``SeriesTable.window`` (all absent, masked); the
  datamodule refuses it for a training row (``tests/data/test_datamodule_inputs.py``).

Covered in ``tests/data/test_series.py`` and not repeated here: ``test_bad_count`` (empty cell,
``nan``, ``-3``, ``abc``, ``inf`` in a small CSV), ``test_parquet_round_trip`` (``-3`` in
Parquet), ``test_duplicate_hour`` (one instant written with two offsets and conflicting values),
``test_naive_timestamps_need_a_timezone``, ``test_naive_timestamps_with_timezone`` (Melbourne
fall-back hour listed twice, spring-forward gap), ``test_mixed_naive_and_aware``,
``test_parse_start`` (naive / skipped window starts), ``test_real_window_across_dst_end`` /
``_start`` (aware real rows).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fusion.data.series import SeriesTable, SeriesWindow, encode_window
from fusion.errors import InputError
from fusion.models.classifier import standardize_counts
from tests.conftest import DATA
from tests.data.real_inputs import AUCKLAND, DST_DAYS, MELBOURNE, SENSORS, write_rows

HEADER = "sensor_id,timestamp,count\n"


# ---------------------------------------------------------------------------------- counts
def inject(frame: pd.DataFrame, row: int, cell: str) -> tuple[pd.DataFrame, int]:
    """``frame`` with one count replaced, and the file line of that row (header = line 1)."""
    out = frame.copy()
    out.loc[row, "count"] = cell
    return out, row + 2


@pytest.mark.parametrize(
    ("cell", "match"),
    [
        ("NaN", r"missing value \('NaN'\): leave out the row"),
        ("NA", r"missing value \('NA'\)"),
        ("null", r"missing value \('null'\)"),
        ("-inf", "is not a finite non-negative number"),
        ("1e39", r"'1e\+?39' is too large .*float32"),
        ("1e308", r"'1e\+?308' is too large"),
    ],
)
def test_bad_counts_in_real_gzip_rows(
    real_counts: pd.DataFrame, tmp_path: Path, cell: str, match: str
) -> None:
    # Forms test_bad_count does not try, in the bundle's own .csv.gz format; 1e39 and 1e308 are
    # finite in float64 but used to turn into inf when stored as float32.
    frame, line = inject(real_counts, 137, cell)
    path = write_rows(frame, tmp_path / "counts.csv.gz")
    with pytest.raises(InputError, match=match) as exc:
        SeriesTable.read(path)
    assert (exc.value.file, exc.value.line, exc.value.field) == (str(path), line, "count")


def test_bad_counts_in_typed_parquet(real_counts: pd.DataFrame, tmp_path: Path) -> None:
    # A float column: NaN is a real float NaN (not text) and 1e39 a float64.
    numbers = real_counts.assign(count=real_counts["count"].astype(float))
    for value, match in [(np.nan, r"missing value \(empty or NaN\)"), (1e39, "too large")]:
        frame = numbers.copy()
        frame.loc[40, "count"] = value
        path = write_rows(frame, tmp_path / "counts.parquet")
        with pytest.raises(InputError, match=match) as exc:
            SeriesTable.read(path)
        assert (exc.value.file, exc.value.where, exc.value.field) == (str(path), "row 41", "count")


def test_huge_but_storable_counts_are_kept_and_stay_finite(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    sensor = real_counts[real_counts["sensor_id"] == "mel_VAC_T"].reset_index(drop=True)
    frame = sensor.copy()
    frame.loc[5, "count"] = "1e12"
    frame.loc[6, "count"] = "3.4e38"  # just under the float32 limit
    table = SeriesTable.read(write_rows(frame, tmp_path / "counts.csv"))
    start = pd.Timestamp(sensor["timestamp"].iloc[0]).tz_convert("UTC")
    window = table.window("mel_VAC_T", start, 24)
    assert window.values[5, 0] == np.float32(1e12) and window.values[6, 0] == np.float32(3.4e38)

    def standardized(features: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        return standardize_counts(torch.from_numpy(features)[None], torch.from_numpy(mask)[None], 1)

    # log1p (the default) keeps even 3.4e38 small (~88.7): the model's inputs stay finite.
    features, mask = encode_window(window)
    assert features[6, 0] == pytest.approx(np.log1p(3.4e38), rel=1e-6)
    assert np.isfinite(features).all() and torch.isfinite(standardized(features, mask)).all()
    # Raw counts (log1p off): 1e12 stays finite through the per-window standardisation too.
    only_1e12 = window.values.copy()
    only_1e12[6, 0] = 100.0
    raw = SeriesWindow(only_1e12, window.present, window.local_hour, window.local_dow)
    features, mask = encode_window(raw, log1p=False)
    assert features[5, 0] == np.float32(1e12)
    assert torch.isfinite(standardized(features, mask)).all()


# ---------------------------------------------------------------------------------- time stamps
def test_real_naive_timestamps_localize_like_their_offsets(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    # The real rows around both 2021 DST changes of each city, with and without their offsets.
    for sensor, zone in SENSORS.items():
        aware = real_counts[real_counts["sensor_id"] == sensor]
        naive = aware.assign(timestamp=aware["timestamp"].str.slice(0, 19))
        assert not naive["timestamp"].str.contains(r"[+Z]").any()
        want = SeriesTable.read(write_rows(aware, tmp_path / "aware.csv"), timezone=zone)
        got = SeriesTable.read(write_rows(naive, tmp_path / "naive.csv"), timezone=zone)
        assert got.span(sensor) == want.span(sensor)
        for change in DST_DAYS[zone]:
            start = pd.Timestamp(f"{change}T00:00").tz_localize(zone).tz_convert("UTC")
            a, b = want.window(sensor, start, 24), got.window(sensor, start, 24)
            for name in ("values", "present", "local_hour", "local_dow"):
                np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
            hours = b.local_hour.tolist()
            if change.endswith("-04-04"):  # fall back: 02:00 twice, the second without a count
                assert hours[:4] == [0, 1, 2, 2] and b.present[2] and not b.present[3]
            else:  # spring forward: no 02:00
                assert hours[:3] == [0, 1, 3] and b.present[:3].all()


def test_naive_datetime_parquet_needs_a_timezone(real_counts: pd.DataFrame, tmp_path: Path) -> None:
    # Typed (datetime64, no zone) Parquet time stamps, not text: the same rules as naive text.
    sensor = real_counts[real_counts["sensor_id"] == "akl_297_Queen_Street"]
    typed = sensor.assign(
        timestamp=pd.to_datetime(sensor["timestamp"].str.slice(0, 19)),
        count=sensor["count"].astype(float),
    )
    assert typed["timestamp"].dt.tz is None
    path = write_rows(typed, tmp_path / "naive.parquet")
    with pytest.raises(InputError, match="has no UTC offset; pass timezone") as exc:
        SeriesTable.read(path)
    assert (exc.value.file, exc.value.where, exc.value.field) == (str(path), "row 1", "timestamp")
    got = SeriesTable.read(path, timezone=AUCKLAND)
    want = SeriesTable.read(write_rows(sensor, tmp_path / "aware.csv"), timezone=AUCKLAND)
    assert got.n_rows == want.n_rows == len(sensor)
    start = want.span("akl_297_Queen_Street")[0]
    np.testing.assert_array_equal(
        got.window("akl_297_Queen_Street", start, 72).values,
        want.window("akl_297_Queen_Street", start, 72).values,
    )


def test_fall_back_hour_listed_a_third_time_is_a_duplicate(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    sensor = real_counts[real_counts["sensor_id"] == "mel_VAC_T"].reset_index(drop=True)
    naive = sensor.assign(timestamp=sensor["timestamp"].str.slice(0, 19))
    at = int(np.flatnonzero(naive["timestamp"] == "2021-04-04T02:00:00")[0])
    extra = naive.iloc[[at]].assign(count="7")
    twice = pd.concat([naive.iloc[: at + 1], extra, naive.iloc[at + 1 :]], ignore_index=True)
    table = SeriesTable.read(write_rows(twice, tmp_path / "twice.csv"), timezone=MELBOURNE)
    # The second 02:00 is the standard-time hour (absent from the real data until now).
    window = table.window("mel_VAC_T", pd.Timestamp("2021-04-03T15:00Z"), 2)
    assert window.present.all() and window.values[1, 0] == 7
    thrice = pd.concat([twice.iloc[: at + 2], extra, twice.iloc[at + 2 :]], ignore_index=True)
    path = write_rows(thrice, tmp_path / "thrice.csv")
    with pytest.raises(InputError, match=r"duplicate hour .*first given on line") as exc:
        SeriesTable.read(path, timezone=MELBOURNE)
    assert (exc.value.file, exc.value.line) == (str(path), at + 4)
    assert f"line {at + 3}" in exc.value.message


# ---------------------------------------------------------------------------------- duplicates
def test_identical_duplicate_rows_are_an_error(real_counts: pd.DataFrame, tmp_path: Path) -> None:
    # An export concatenated twice: every row repeated with the same value. The first repeated
    # row is named, with the line of its original.
    sensor = real_counts[real_counts["sensor_id"] == "mel_VAC_T"].reset_index(drop=True)
    doubled = pd.concat([sensor, sensor.iloc[10:]], ignore_index=True)
    path = write_rows(doubled, tmp_path / "counts.csv.gz")
    with pytest.raises(
        InputError, match=r"duplicate hour .*'mel_VAC_T' .*first given on line 12"
    ) as exc:
        SeriesTable.read(path)
    assert (exc.value.file, exc.value.line, exc.value.field) == (str(path), len(sensor) + 2, None)
    parquet = write_rows(
        doubled.assign(count=doubled["count"].astype(float)), tmp_path / "d.parquet"
    )
    with pytest.raises(InputError, match=r"first given on row 11") as exc:
        SeriesTable.read(parquet)
    assert exc.value.where == f"row {len(sensor) + 1}"


# ---------------------------------------------------------------------------------- empty series
@pytest.mark.parametrize("form", ["header.csv", "blank-lines.csv", "header.csv.gz", "rows.parquet"])
def test_table_without_data_rows_is_an_error(
    real_counts: pd.DataFrame, tmp_path: Path, form: str
) -> None:
    path = tmp_path / form
    if form.endswith(".parquet"):
        write_rows(real_counts.iloc[:0], path)
    elif form.endswith(".gz"):
        with gzip.open(DATA / "footfall" / "counts.csv.gz", "rt") as f:
            header = f.readline()  # the real file's own header
        with gzip.open(path, "wt") as f:
            f.write(header)
    else:
        path.write_text(HEADER + ("\n\n\n" if form.startswith("blank") else ""))
    with pytest.raises(InputError, match="table has no data rows") as exc:
        SeriesTable.read(path)
    assert exc.value.file == str(path)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read CSV") as exc:
        SeriesTable.read(path)
    assert exc.value.file == str(path)


def test_key_with_only_nan_counts_is_named_at_its_first_row(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    frame = real_counts.copy()
    akl = frame["sensor_id"] == "akl_297_Queen_Street"
    frame.loc[akl, "count"] = ""
    path = write_rows(frame, tmp_path / "counts.csv")
    with pytest.raises(InputError, match=r"missing value \(empty or NaN\)") as exc:
        SeriesTable.read(path)
    first = int(np.flatnonzero(akl.to_numpy())[0]) + 2
    assert (exc.value.file, exc.value.line, exc.value.field) == (str(path), first, "count")


def test_window_with_no_present_hour_is_all_absent(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    # SeriesTable keeps such a window (all NaN, all masked, zero features); the datamodule refuses
    # it for a training row (see test_damaged_real_inputs_through_the_datamodule).
    sensor = real_counts[real_counts["sensor_id"] == "mel_VAC_T"].reset_index(drop=True)
    gap = sensor.drop(index=range(24, 48))
    table = SeriesTable.read(write_rows(gap, tmp_path / "counts.csv"))
    start = pd.Timestamp(sensor["timestamp"].iloc[24]).tz_convert("UTC")
    window = table.window("mel_VAC_T", start, 24)
    assert not window.present.any() and np.isnan(window.values).all()
    features, mask = encode_window(window)
    assert not mask.any() and (features[:, 0] == 0).all() and np.isfinite(features).all()
