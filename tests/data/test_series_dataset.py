"""Activity tables read in part: a partitioned Parquet folder, and only the keys and hours the
samples need (files and row groups that cannot hold them are not read), on real footfall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fusion.data import samples as samples_module
from fusion.data.datamodule import FusionDataModule
from fusion.data.series import SeriesTable, encode_window, parse_start
from fusion.errors import InputError

SENSORS = ["akl_150_K_Road", "akl_297_Queen_Street", "mel_VAC_T"]
START = "2021-03-01T00:00:00Z"  # every one of SENSORS has its rows here


@pytest.fixture(scope="module")
def counts(shared_data: Path) -> pd.DataFrame:
    """Real hourly counts of three sensors, January to June 2021 (text time stamps)."""
    raw = pd.read_csv(shared_data / "footfall" / "counts.csv.gz", dtype={"timestamp": str})
    rows = raw[raw["sensor_id"].isin(SENSORS) & raw["timestamp"].str.startswith("2021-0")]
    rows = rows[rows["timestamp"].str.slice(5, 7) <= "06"].reset_index(drop=True)
    assert set(rows["sensor_id"]) == set(SENSORS)
    return rows


@pytest.fixture(scope="module")
def tables(counts: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same rows as a CSV, a folder partitioned by month (several files, row groups of 500
    rows, UTC timestamps) and a folder partitioned by sensor (the key only in folder names)."""
    folder = tmp_path_factory.mktemp("tables")
    csv = folder / "counts.csv"
    counts.to_csv(csv, index=False)
    typed = counts.assign(
        timestamp=pd.to_datetime(counts["timestamp"], format="ISO8601", utc=True),
        month=counts["timestamp"].str.slice(0, 7),
        count=counts["count"].astype("float32"),
    )
    table = pa.Table.from_pandas(typed, preserve_index=False)
    by_month, by_sensor = folder / "by_month", folder / "by_sensor"
    ds.write_dataset(
        table, by_month, format="parquet", partitioning=["month"],
        partitioning_flavor="hive", max_rows_per_group=500, min_rows_per_group=1,
    )  # fmt: skip
    ds.write_dataset(
        table.drop_columns(["month"]), by_sensor, format="parquet", partitioning=["sensor_id"],
        partitioning_flavor="hive",
    )  # fmt: skip
    return {"csv": csv, "by_month": by_month, "by_sensor": by_sensor}


def windows(table: SeriesTable, keys: list[str], hours: int = 24 * 28) -> list[np.ndarray]:
    start = parse_start(START)
    return [table.window(k, start, hours).values for k in keys]


@pytest.mark.parametrize("layout", ["by_month", "by_sensor"])
def test_a_partitioned_folder_reads_like_the_csv(tables: dict[str, Path], layout: str) -> None:
    whole = SeriesTable.read(tables["csv"])
    parted = SeriesTable.read(tables[layout])
    assert parted.keys == whole.keys == sorted(SENSORS) and parted.n_rows == whole.n_rows
    for a, b in zip(windows(whole, SENSORS), windows(parted, SENSORS), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["csv", "by_month", "by_sensor"])
def test_only_the_keys_and_hours_asked_for_are_kept(
    tables: dict[str, Path], counts: pd.DataFrame, layout: str
) -> None:
    first, last = parse_start(START), parse_start("2021-03-28T23:00:00Z")
    table = SeriesTable.read(tables[layout], keys={SENSORS[0]}, span=(first, last))
    assert table.keys == [SENSORS[0]]
    stamps = pd.to_datetime(counts["timestamp"], format="ISO8601", utc=True)
    expected = (counts["sensor_id"] == SENSORS[0]) & (stamps >= first) & (stamps <= last)
    assert table.n_rows == int(expected.sum()) > 600
    full = SeriesTable.read(tables["csv"])
    np.testing.assert_array_equal(windows(table, SENSORS[:1]), windows(full, SENSORS[:1]))
    # What was not read is said so, not passed off as missing from the table.
    with pytest.raises(InputError, match=r"'mel_VAC_T' not found .*rows read: 2021-03-01"):
        table.window("mel_VAC_T", first, 24)
    with pytest.raises(InputError, match=r"outside the span.*rows read"):
        table.window(SENSORS[0], parse_start("2021-04-01T00:00:00Z"), 24)


def test_files_that_cannot_hold_the_keys_are_not_opened(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "by_sensor"
    for part in tables["by_sensor"].rglob("*.parquet"):
        target = folder / part.relative_to(tables["by_sensor"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(part.read_bytes())
    (damaged,) = (folder / "sensor_id=mel_VAC_T").glob("*.parquet")
    damaged.write_bytes(b"not parquet at all")
    table = SeriesTable.read(folder, keys={SENSORS[0], SENSORS[1]})
    assert table.keys == SENSORS[:2]
    with pytest.raises(InputError, match="cannot read Parquet") as err:
        SeriesTable.read(folder, keys={"mel_VAC_T"})
    assert err.value.file == str(damaged)


def test_a_bad_row_of_a_part_is_named_by_its_file_and_row(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    (part,) = (tables["by_month"] / "month=2021-04").glob("*.parquet")
    frame = pq.read_table(part).to_pandas()
    row = 700  # in the file's second row group
    frame.loc[row, "count"] = -3.0
    bad = tmp_path / "by_month" / "month=2021-04"
    bad.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), bad / part.name,
                   row_group_size=500)  # fmt: skip
    with pytest.raises(InputError, match="not a finite non-negative") as err:
        SeriesTable.read(tmp_path / "by_month")
    assert err.value.file == str(bad / part.name) and err.value.where == f"row {row + 1}"
    # A read that does not need that row neither reads nor checks it.
    other = [k for k in SENSORS if k != frame.loc[row, "sensor_id"]]
    assert SeriesTable.read(tmp_path / "by_month", keys=set(other)).keys == sorted(other)


def test_a_folder_without_parquet_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files") as err:
        SeriesTable.read(tmp_path / "empty")
    assert err.value.file == str(tmp_path / "empty")


@pytest.fixture(scope="module")
def manifest(
    small_manifest: Path, tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Six rows of the real benchmark's tiles, their windows moved onto SENSORS in 2021."""
    frame = pd.read_csv(small_manifest).head(6)
    frame["sensor_id"] = [SENSORS[i % 3] for i in range(6)]
    frame["start"] = [f"2021-0{3 + i % 3}-0{1 + i // 3}T00:00:00Z" for i in range(6)]
    frame["hours"] = 24 * 14
    frame["split"] = ["train", "train", "train", "val", "val", "val"]
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


def test_the_datamodule_builds_the_same_windows_from_any_layout_in_any_passes(
    manifest: Path, tables: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def built(series: Path, cache: str) -> FusionDataModule:
        # The Parquet tables hold UTC instants: the local calendar of every layout is UTC's.
        dm = FusionDataModule(manifest=str(manifest), series=str(series), image_size=56,
                              cache_dir=cache, timezone="UTC")  # fmt: skip
        dm.setup()
        return dm

    reference = built(tables["csv"], "")  # one pass, in memory
    monkeypatch.setattr(samples_module, "KEYS_PER_PASS", 1)  # a pass per sensor
    for layout in ("by_month", "by_sensor"):
        dm = built(tables[layout], str(tmp_path / layout))
        assert isinstance(dm.series.values, np.memmap)  # on disk, read per sample
        for name in ("values", "mask", "hour", "dow", "present"):
            np.testing.assert_array_equal(getattr(dm.series, name), getattr(reference.series, name))
    # What a sample holds is the encoded window of the table.
    table = SeriesTable.read(tables["csv"], timezone="UTC")
    frame = pd.read_csv(manifest)
    for i in range(6):
        window = table.window(frame["sensor_id"][i], parse_start(frame["start"][i]), 24 * 14)
        features, mask = encode_window(window)
        sample = reference.dataset("all")[i]
        np.testing.assert_array_equal(sample["series"].numpy(), features)
        np.testing.assert_array_equal(sample["series_mask"].numpy(), mask)
