"""Long-format series tables: the real footfall counts, the benchmark windows, and input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.data.series import (
    CALENDAR_FEATURES,
    SeriesTable,
    SeriesWindow,
    encode_window,
    parse_start,
)
from fusion.errors import InputError

MELBOURNE = "Australia/Melbourne"
AUCKLAND = "Pacific/Auckland"


@pytest.fixture(scope="module")
def footfall(shared_data: Path) -> SeriesTable:
    return SeriesTable.read(shared_data / "footfall" / "counts.csv.gz")


@pytest.fixture(scope="module")
def manifest(shared_data: Path) -> pd.DataFrame:
    return pd.read_csv(shared_data / "paired" / "manifest.csv")


def zone_of(sensor_id: str) -> str:
    return MELBOURNE if sensor_id.startswith("mel_") else AUCKLAND


def write(tmp_path: Path, text: str, name: str = "counts.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the real footfall counts ------------------------------------------------------------------


def test_real_table_size(footfall: SeriesTable) -> None:
    assert len(footfall.keys) == 53
    assert footfall.keys == sorted(footfall.keys)
    assert footfall.n_rows == 1288328
    assert footfall.value_columns == ("count",)
    assert "mel_VAC_T" in footfall
    assert "mel_nowhere" not in footfall


def test_real_spans_match_sensors_csv(footfall: SeriesTable, shared_data: Path) -> None:
    sensors = pd.read_csv(shared_data / "footfall" / "sensors.csv").set_index("sensor_id")
    for sensor in ("mel_VAC_T", "akl_150_K_Road"):
        first, last = footfall.span(sensor)
        assert first == pd.Timestamp(sensors.loc[sensor, "first_timestamp"]).tz_convert("UTC")
        assert last == pd.Timestamp(sensors.loc[sensor, "last_timestamp"]).tz_convert("UTC")
        assert str(first.tz) == "UTC"


def test_real_manifest_windows(footfall: SeriesTable, manifest: pd.DataFrame) -> None:
    for row in manifest.head(3).itertuples():
        start = parse_start(row.start)
        window = footfall.window(row.sensor_id, start, row.hours)
        assert window.values.shape == (672, 1)
        assert window.values.dtype == np.float32
        assert window.present.shape == (672,)
        assert window.present_share >= 0.9
        assert np.isnan(window.values[~window.present]).all()
        assert not np.isnan(window.values[window.present]).any()
        # The start is a local midnight; the whole local calendar agrees with the city's zone.
        local = pd.date_range(start, periods=672, freq="h").tz_convert(zone_of(row.sensor_id))
        assert window.local_hour[0] == 0
        assert window.local_dow[0] == pd.Timestamp(row.start).weekday()
        np.testing.assert_array_equal(window.local_hour, local.hour)
        np.testing.assert_array_equal(window.local_dow, local.day_of_week)
        features, mask = encode_window(window)
        assert features.shape == (672, 5)
        assert features.dtype == np.float32
        np.testing.assert_array_equal(mask, window.present)


def test_real_window_across_dst_end(footfall: SeriesTable, manifest: pd.DataFrame) -> None:
    # p00001: mel_VAC_T from 2022-03-21 00:00+11:00; Melbourne falls back on 2022-04-03 at 03:00
    # (+11:00) -> 02:00 (+10:00), i.e. at 2022-04-02 16:00 UTC, slot 13 * 24 + 3 = 315.
    row = manifest.iloc[1]
    assert (row.sensor_id, row.start) == ("mel_VAC_T", "2022-03-21T00:00:00+11:00")
    window = footfall.window(row.sensor_id, parse_start(row.start), int(row.hours))
    assert window.local_hour[313:318].tolist() == [1, 2, 2, 3, 4]
    assert window.local_dow[315] == 6  # Sunday
    # 672 absolute hours from a local midnight end at 22:00 after falling back one hour.
    assert window.local_hour[-1] == 22


def test_real_window_across_dst_start(footfall: SeriesTable) -> None:
    # Melbourne springs forward on 2021-10-03 at 02:00 (+10:00) -> 03:00 (+11:00).
    start = parse_start("2021-10-02T00:00:00+10:00")
    window = footfall.window("mel_VAC_T", start, 48)
    assert window.local_hour[24:28].tolist() == [0, 1, 3, 4]
    # The last of 48 absolute hours is local midnight of Monday 2021-10-04 (one hour was skipped).
    assert (window.local_hour[-1], window.local_dow[-1]) == (0, 0)


def test_real_window_values_match_raw_rows(
    footfall: SeriesTable, manifest: pd.DataFrame, shared_data: Path
) -> None:
    row = manifest.iloc[0]
    raw = pd.read_csv(shared_data / "footfall" / "counts.csv.gz")
    raw = raw[raw["sensor_id"] == row.sensor_id]
    instants = pd.to_datetime(raw["timestamp"], utc=True)
    start = pd.Timestamp(row.start).tz_convert("UTC")
    inside = (instants >= start) & (instants < start + pd.Timedelta(hours=672))
    slots = ((instants[inside] - start) // pd.Timedelta(hours=1)).to_numpy()
    expected = np.full(672, np.nan)
    expected[slots] = raw.loc[inside, "count"].to_numpy()

    window = footfall.window(row.sensor_id, parse_start(row.start), 672)
    np.testing.assert_array_equal(window.values[:, 0], expected)
    np.testing.assert_array_equal(window.present, ~np.isnan(expected))
    assert len(slots) > 600


# --- windows and encoding ----------------------------------------------------------------------


def test_encode_window_by_hand() -> None:
    window = SeriesWindow(
        values=np.array([[0.0], [np.nan], [np.e - 1]], dtype=np.float32),
        present=np.array([True, False, True]),
        local_hour=np.array([0, 6, 12]),
        local_dow=np.array([0, 0, 0]),
    )
    assert window.present_share == pytest.approx(2 / 3)
    features, mask = encode_window(window)
    assert len(CALENDAR_FEATURES) == 4
    assert features.shape == (3, 5)
    np.testing.assert_allclose(features[:, 0], [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(features[:, 1], [0.0, 1.0, 0.0], atol=1e-6)  # hour_sin
    np.testing.assert_allclose(features[:, 2], [1.0, 0.0, -1.0], atol=1e-6)  # hour_cos
    np.testing.assert_allclose(features[:, 3:], [[0.0, 1.0]] * 3, atol=1e-6)  # Monday
    np.testing.assert_array_equal(mask, [True, False, True])
    raw, _ = encode_window(window, log1p=False)
    np.testing.assert_allclose(raw[:, 0], [0.0, 0.0, np.e - 1], atol=1e-6)


def test_parse_start() -> None:
    assert parse_start("2021-03-01T08:00:00+11:00") == pd.Timestamp("2021-02-28T21:00:00Z")
    assert parse_start("2021-03-01 08:00", timezone=MELBOURNE) == pd.Timestamp(
        "2021-02-28T21:00:00Z"
    )
    # The repeated 02:00 of 2021-04-04 is taken as the first (daylight-time) one.
    assert parse_start("2021-04-04T02:00:00", timezone=MELBOURNE) == pd.Timestamp(
        "2021-04-03T15:00:00Z"
    )
    for bad, match in [
        ("2021-03-01T08:00:00", "no UTC offset"),
        ("yesterday", "cannot parse"),
        ("2021-03-01T08:30:00+11:00", "not on a whole UTC hour"),
    ]:
        with pytest.raises(InputError, match=match) as info:
            parse_start(bad)
        assert info.value.line is None and info.value.file is None
    with pytest.raises(InputError, match="does not exist"):
        parse_start("2021-10-03T02:00:00", timezone=MELBOURNE)


def test_window_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\na,2021-01-01T05:00:00Z,2\n"
    )
    table = SeriesTable.read(path)
    with pytest.raises(InputError, match=r"series key 'b' not found in .*counts\.csv") as info:
        table.window("b", pd.Timestamp("2021-01-01T00:00:00Z"), 2)
    assert info.value.line is None
    with pytest.raises(InputError, match=r"outside the span .*2021-01-01T05:00:00\+00:00") as info:
        table.window("a", pd.Timestamp("2021-01-01T01:00:00Z"), 6)
    assert info.value.line is None
    with pytest.raises(InputError, match="no UTC offset"):
        table.window("a", pd.Timestamp("2021-01-01T00:00:00"), 2)
    window = table.window("a", pd.Timestamp("2021-01-01T11:00:00+11:00"), 6)
    np.testing.assert_array_equal(window.present, [True, False, False, False, False, True])
    np.testing.assert_array_equal(window.values[[0, 5], 0], [1, 2])


# --- reading: timestamps and time zones --------------------------------------------------------


def test_naive_timestamps_need_a_timezone(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sensor_id,timestamp,count\na,2021-01-01 00:00,1\na,2021-01-01 01:00,2\n"
    )
    with pytest.raises(InputError, match="no UTC offset; pass timezone") as info:
        SeriesTable.read(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 2, "timestamp")


def test_naive_timestamps_with_timezone(tmp_path: Path) -> None:
    # 2021-04-04: Melbourne falls back 03:00 (+11) -> 02:00 (+10); the 02:00 listed twice are
    # the daylight-time and then the standard-time hour.
    path = write(
        tmp_path,
        "sensor_id,timestamp,count\n"
        "a,2021-04-04 01:00,1\n"
        "a,2021-04-04 02:00,2\n"
        "a,2021-04-04 02:00,3\n"
        "a,2021-04-04 03:00,4\n"
        "b,2021-04-04 02:00,5\n",
    )
    table = SeriesTable.read(path, timezone=MELBOURNE)
    assert table.span("a") == (
        pd.Timestamp("2021-04-03T14:00:00Z"),
        pd.Timestamp("2021-04-03T17:00:00Z"),
    )
    window = table.window("a", pd.Timestamp("2021-04-03T14:00:00Z"), 4)
    np.testing.assert_array_equal(window.values[:, 0], [1, 2, 3, 4])
    assert window.local_hour.tolist() == [1, 2, 2, 3]
    assert table.span("b")[0] == pd.Timestamp("2021-04-03T15:00:00Z")

    gap = write(tmp_path, "sensor_id,timestamp,count\na,2021-10-03 01:00,1\na,2021-10-03 02:00,2\n")
    with pytest.raises(InputError, match="does not exist in Australia/Melbourne") as info:
        SeriesTable.read(gap, timezone=MELBOURNE)
    assert info.value.line == 3


def test_timezone_sets_local_calendar_of_aware_rows(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\na,2021-01-01T02:00:00Z,2\n"
    )
    start = pd.Timestamp("2021-01-01T00:00Z")
    assert SeriesTable.read(path).window("a", start, 3).local_hour.tolist() == [0, 1, 2]
    local = SeriesTable.read(path, timezone=AUCKLAND).window("a", start, 3)
    assert local.local_hour.tolist() == [13, 14, 15]
    assert local.local_dow.tolist() == [4, 4, 4]  # Friday 2021-01-01 in Auckland


def test_gap_takes_offset_of_nearest_row(tmp_path: Path) -> None:
    # No zone: absent hours take the offset of the nearest row (ties -> the later row).
    path = write(
        tmp_path,
        "sensor_id,timestamp,count\na,2021-04-04T00:00:00+11:00,1\na,2021-04-04T03:00:00+10:00,2\n",
    )
    window = SeriesTable.read(path).window("a", pd.Timestamp("2021-04-04T00:00:00+11:00"), 5)
    # UTC 13,14,15,16,17 h; rows at 13 h (+11) and 17 h (+10).
    assert window.local_hour.tolist() == [0, 1, 1, 2, 3]


def test_mixed_naive_and_aware(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sensor_id,timestamp,count\na,2021-01-01T00:00:00+11:00,1\na,2021-01-01T01:00:00,2\n",
    )
    with pytest.raises(InputError, match="has no UTC offset while others have one") as info:
        SeriesTable.read(path, timezone=MELBOURNE)
    assert (info.value.line, info.value.field) == (3, "timestamp")


@pytest.mark.parametrize(
    ("cell", "match"),
    [
        ("2021-13-01T00:00:00Z", "cannot parse timestamp"),
        ("", "missing timestamp"),
        ("soon", "cannot parse"),
    ],
)
def test_unparseable_timestamp(tmp_path: Path, cell: str, match: str) -> None:
    path = write(tmp_path, f"sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\na,{cell},2\n")
    with pytest.raises(InputError, match=match) as info:
        SeriesTable.read(path)
    assert (info.value.line, info.value.field) == (3, "timestamp")


def test_timestamp_not_on_the_hour(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\na,2021-01-01T00:30:00Z,2\n"
    )
    with pytest.raises(InputError, match="not on a whole UTC hour") as info:
        SeriesTable.read(path)
    assert info.value.line == 3


# --- reading: values, keys, duplicates, columns, formats ---------------------------------------


@pytest.mark.parametrize(
    ("cell", "match"),
    [
        ("-3", r"'-3(\.0)?' is not a finite non-negative number"),
        ("", "missing value"),
        ("nan", "not a finite non-negative number|missing value"),
        ("abc", "'abc' is not a finite non-negative number"),
        ("inf", "not a finite non-negative number"),
    ],
)
def test_bad_count(tmp_path: Path, cell: str, match: str) -> None:
    path = write(
        tmp_path,
        f"sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\n\na,2021-01-01T01:00:00Z,{cell}\n",
    )
    with pytest.raises(InputError, match=match) as info:
        SeriesTable.read(path)
    # Line 3 is blank and skipped; the bad row is on line 4.
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 4, "count")


def test_duplicate_hour(tmp_path: Path) -> None:
    # The same instant written with two offsets.
    path = write(
        tmp_path,
        "sensor_id,timestamp,count\n"
        "a,2021-01-01T00:00:00+11:00,1\n"
        "b,2020-12-31T13:00:00Z,1\n"
        "a,2021-01-01T01:00:00+11:00,1\n"
        "a,2020-12-31T13:00:00Z,2\n",
    )
    with pytest.raises(
        InputError, match=r"duplicate hour .* key 'a' .*first given on line 2"
    ) as info:
        SeriesTable.read(path)
    assert info.value.line == 5


def test_missing_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, "sensor_id,timestamp,count\na,2021-01-01T00:00:00Z,1\n,2021-01-01T01:00:00Z,2\n"
    )
    with pytest.raises(InputError, match="missing key") as info:
        SeriesTable.read(path)
    assert (info.value.line, info.value.field) == (3, "sensor_id")


def test_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "sensor_id,time,count\na,2021-01-01T00:00:00Z,1\n")
    with pytest.raises(InputError, match="column missing") as info:
        SeriesTable.read(path)
    assert (info.value.file, info.value.field) == (str(path), "timestamp")
    table = SeriesTable.read(path, time_column="time")
    assert table.keys == ["a"]
    with pytest.raises(InputError) as info:
        SeriesTable.read(path, time_column="time", value_columns=("count", "visits"))
    assert info.value.field == "visits"


@pytest.mark.parametrize(("sep", "name"), [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_other_delimiter_is_named(shared_data: Path, tmp_path: Path, sep: str, name: str) -> None:
    real = pd.read_csv(shared_data / "footfall" / "counts.csv.gz", nrows=30, dtype=str)
    path = tmp_path / "counts.csv.gz"
    real.to_csv(path, sep=sep, index=False)
    with pytest.raises(InputError, match="column missing from the table header") as info:
        SeriesTable.read(path)
    assert (info.value.file, info.value.field) == (str(path), "sensor_id")
    assert repr(sep.join(real.columns)) in str(info.value)
    assert f"looks {name}-separated" in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    """(A header without rows: tests/test_reliability_inputs.py)"""
    path = write(tmp_path, "")
    with pytest.raises(InputError, match="the file is empty") as info:
        SeriesTable.read(path)
    assert info.value.file == str(path)


def test_unsupported_and_absent_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unsupported table format"):
        SeriesTable.read(write(tmp_path, "x", name="counts.xlsx"))
    with pytest.raises(InputError, match="file not found"):
        SeriesTable.read(tmp_path / "absent.csv")


def test_parquet_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "sensor_id": ["a", "a", "a", "b", "b"],
            "timestamp": [
                "2021-04-03T23:00:00+11:00",
                "2021-04-04T02:00:00+11:00",
                "2021-04-04T03:00:00+10:00",
                "2021-04-04T00:00:00+11:00",
                "2021-04-04T01:00:00+11:00",
            ],
            "count": [1, 2, 3, 4, 5],
        }
    )
    csv_path = tmp_path / "counts.csv.gz"
    frame.to_csv(csv_path, index=False)
    text_path = tmp_path / "text.parquet"
    frame.to_parquet(text_path)
    instants = pd.to_datetime(frame["timestamp"], utc=True)
    typed = frame.assign(timestamp=instants.dt.tz_convert(MELBOURNE))
    typed_path = tmp_path / "typed.parquet"
    typed.to_parquet(typed_path)

    start = pd.Timestamp("2021-04-03T23:00:00+11:00")
    expected = SeriesTable.read(csv_path).window("a", start, 6)
    assert expected.present.tolist() == [True, False, False, True, False, True]
    assert expected.local_hour.tolist() == [23, 0, 1, 2, 2, 3]
    for path in (text_path, typed_path):
        window = SeriesTable.read(path).window("a", start, 6)
        for name in ("values", "present", "local_hour", "local_dow"):
            np.testing.assert_array_equal(getattr(window, name), getattr(expected, name))

    bad = tmp_path / "bad.parquet"
    frame.assign(count=[1, 2, -3, 4, 5]).to_parquet(bad)
    with pytest.raises(InputError, match="not a finite non-negative number") as info:
        SeriesTable.read(bad)
    assert (info.value.where, info.value.field) == ("row 3", "count")


def _same_tables(a: SeriesTable, b: SeriesTable) -> bool:
    if a.keys != b.keys:
        return False
    return all(
        np.array_equal(getattr(a._series[k], f), getattr(b._series[k], f))
        for k in a.keys
        for f in ("hours", "values", "offsets")
    )


def test_reading_in_chunks_changes_nothing(shared_data: Path, tmp_path: Path) -> None:
    """Real rows of two Melbourne sensors around the 2021-04-04 DST end, as naive local times,
    with the repeated 02:00 listed twice for one sensor: every chunk size gives the table read
    whole, including when the two listings fall in different chunks."""
    real = pd.read_csv(shared_data / "footfall" / "counts.csv.gz", dtype={"timestamp": str})
    day = real[real["sensor_id"].isin(["mel_AG_T", "mel_Bou231_T"])
               & real["timestamp"].str.startswith("2021-04-04T0")].copy()  # fmt: skip
    day["timestamp"] = day["timestamp"].str[:19]  # naive wall-clock times
    first = day.iloc[:3]  # mel_AG_T 00:00, 01:00, 02:00 (daylight time)
    repeat = pd.DataFrame({"sensor_id": ["mel_AG_T"], "timestamp": ["2021-04-04T02:00:00"],
                           "count": [9]})  # fmt: skip
    table = pd.concat([first, repeat, day.iloc[3:]], ignore_index=True)
    path = tmp_path / "naive.csv"
    table.to_csv(path, index=False)
    whole = SeriesTable.read(path, timezone="Australia/Melbourne")
    ag = whole._series["mel_AG_T"]
    stamps = [pd.Timestamp(int(h) * 3600, unit="s", tz="UTC").hour for h in ag.hours[:5]]
    assert stamps == [13, 14, 15, 16, 17]  # 02:00 daylight (15Z), then 02:00 standard (16Z)
    for chunk_rows in range(1, 8):
        chunked = SeriesTable.read(path, timezone="Australia/Melbourne", chunk_rows=chunk_rows)
        assert _same_tables(chunked, whole), chunk_rows


def test_problems_in_later_chunks_name_their_line(tmp_path: Path) -> None:
    lines = ["sensor_id,timestamp,count"]
    lines += [f"a,2021-01-01T{h:02d}:00:00+00:00,{h}" for h in range(10)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join([*lines, "a,2021-01-01T03:00:00+00:00,5"]) + "\n")
    with pytest.raises(InputError, match="duplicate hour") as info:
        SeriesTable.read(path, chunk_rows=4)
    assert info.value.line == 12
    path.write_text("\n".join([*lines, "a,2021-01-01T11:00:00,5"]) + "\n")
    with pytest.raises(InputError, match="no UTC offset while earlier ones have one") as info:
        SeriesTable.read(path, chunk_rows=5, timezone="UTC")  # alone in the third chunk
    assert info.value.line == 12
    path.write_text("\n".join([*lines, "a,2021-01-01T11:00:00+00:00,-1"]) + "\n")
    with pytest.raises(InputError, match="not a finite non-negative") as info:
        SeriesTable.read(path, chunk_rows=4)
    assert info.value.line == 12 and info.value.field == "count"
