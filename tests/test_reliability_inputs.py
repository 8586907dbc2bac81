"""Reliability suite: damaged or odd inputs, each a clear error or a documented, tested handling.

Fixtures are cut from the real data bundle (AID JPEGs, ``rgbn.tif``, footfall counts, the paired
manifest) and then damaged. Cases already covered elsewhere are named here and not repeated:

- tests/data/test_tiles.py: a generated JPEG cut in half, an uncompressed generated GeoTIFF cut in
  half, a GeoTIFF of random bytes (``test_truncated_jpeg_raises``,
  ``test_truncated_geotiff_raises``, ``test_corrupt_geotiff_raises``).
- tests/data/test_series.py ``test_bad_count``: empty cell, ``nan``, ``-3``, ``abc``, ``inf`` in a
  small CSV; ``test_parquet_round_trip``: ``-3`` in Parquet; ``test_duplicate_hour``: one instant
  written with two offsets and conflicting values; ``test_naive_timestamps_need_a_timezone``,
  ``test_naive_timestamps_with_timezone`` (Melbourne fall-back hour listed twice, spring-forward
  gap), ``test_mixed_naive_and_aware``, ``test_parse_start`` (naive / skipped window starts),
  ``test_real_window_across_dst_end`` / ``_start`` (aware real rows).
- tests/data/test_datamodule.py ``test_every_bad_input_is_reported_at_once``: a tiny fake JPEG,
  label ``zebra`` outside ``classes``, a naive window start without ``timezone``, a window with 25%
  of its hours present; ``test_naive_series_table_needs_a_timezone``.
- tests/test_predict.py ``test_bad_manifest_rows_are_named_before_anything_is_written``: a label
  outside a trained model's classes; ``test_a_checkpoint_with_pickled_code_is_refused``.

Documented handlings (see the module docstrings of ``fusion.data.series`` and ``read_tile``):

- an empty/NaN count is an error (leave the row out: absent hours are masked), never a 0;
- a count above the float32 limit is an error (it would become ``inf``); smaller huge counts
  (e.g. 1e12) are kept as they are and stay finite through ``log1p`` and standardisation;
- a naive time stamp repeated by a DST fall-back maps to daylight time the first time a key lists
  it and to standard time the second; a third listing is a duplicate hour;
- a window with no present hour is kept by ``SeriesTable.window`` (all absent, masked) but is an
  error for a training row whatever ``min_present`` is;
- a label with no training row but inside ``classes`` is allowed; its class weight is 0;
- JPEG and GeoTIFF carry no checksum: damage that still decodes gives wrong pixels silently.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fusion.data.datamodule import FusionDataModule
from fusion.data.series import SeriesTable, SeriesWindow, encode_window
from fusion.data.tiles import BandStats, read_tile, tile_info
from fusion.errors import InputError, InputErrors
from fusion.models.classifier import standardize_counts
from tests.conftest import DATA

REAL_JPEG = DATA / "aid" / "Center" / "center_10.jpg"  # the tile of manifest row p00000
REAL_AIRPORT = DATA / "aid" / "Airport" / "airport_1.jpg"  # a label the benchmark never trains on
REAL_TIF = DATA / "geotiff" / "rgbn.tif"  # LZW-compressed, tiled, 4 bands
MELBOURNE = "Australia/Melbourne"
AUCKLAND = "Pacific/Auckland"
SENSORS = {"mel_VAC_T": MELBOURNE, "akl_297_Queen_Street": AUCKLAND}
# 2021 DST changes: both cities fall back on 04-04 (03:00 -> 02:00) and spring forward on 10-03
# (Melbourne) / 09-26 (Auckland) (02:00 -> 03:00).
DST_DAYS = {
    MELBOURNE: ("2021-04-04", "2021-10-03"),
    AUCKLAND: ("2021-04-04", "2021-09-26"),
}
HEADER = "sensor_id,timestamp,count\n"


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_counts(shared_data: Path) -> pd.DataFrame:
    """Real footfall rows (text as in the file) of two sensors, three days around each 2021 DST
    change of their city."""
    raw = pd.read_csv(
        shared_data / "footfall" / "counts.csv.gz", dtype={"timestamp": str, "count": str}
    )
    parts = []
    for sensor, zone in SENSORS.items():
        rows = raw[raw["sensor_id"] == sensor]
        day = rows["timestamp"].str.slice(0, 10)
        for change in DST_DAYS[zone]:
            centre = pd.Timestamp(change)
            near = [(centre + pd.Timedelta(days=d)).strftime("%Y-%m-%d") for d in (-1, 0, 1)]
            parts.append(rows[day.isin(near)])
    frame = pd.concat(parts, ignore_index=True)
    assert len(frame) > 250 and set(frame["sensor_id"]) == set(SENSORS)
    return frame


def write_rows(frame: pd.DataFrame, path: Path) -> Path:
    """A long-format table file (``.csv``, ``.csv.gz`` or ``.parquet``) of ``frame``."""
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def damage(src: Path, dst: Path, how: str) -> Path:
    """A copy of ``src`` cut short, with random or zeroed bytes in its middle, or cut in its
    header."""
    data = src.read_bytes()
    mid = len(data) // 2
    if how == "truncated":
        data = data[: len(data) * 9 // 10]  # the header is intact, the pixel data is not
    elif how == "garbage":
        noise = np.random.default_rng(7).integers(0, 256, 2048, dtype=np.uint8).tobytes()
        data = data[:mid] + noise + data[mid + len(noise) :]
    elif how == "zeroed":
        data = data[:mid] + bytes(4096) + data[mid + 4096 :]
    elif how == "header":
        data = data[:64]
    else:
        raise AssertionError(how)
    dst.write_bytes(data)
    return dst


# ---------------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("src", [REAL_JPEG, REAL_TIF], ids=["jpeg", "geotiff"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "header"])
def test_damaged_real_tiles_raise_naming_the_file(src: Path, how: str, tmp_path: Path) -> None:
    path = damage(src, tmp_path / f"{how}{src.suffix}", how)
    if how == "header":
        with pytest.raises(InputError, match="cannot read image") as exc:
            tile_info(path)
        assert exc.value.file == str(path)
    else:
        # Only the header is read up front: the damage shows when the pixels are decoded.
        assert tile_info(path) == tile_info(src)
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(path)
    assert exc.value.file == str(path)
    assert str(path) in str(exc.value)


def test_damage_that_still_decodes_is_not_detectable(tmp_path: Path) -> None:
    # Documented limitation: a JPEG has no checksum, so zeroed bytes inside its image data decode
    # to wrong pixels without an error. A compressed GeoTIFF's blocks do not decompress: error.
    jpeg = damage(REAL_JPEG, tmp_path / "zeroed.jpg", "zeroed")
    tile = read_tile(jpeg)
    original = read_tile(REAL_JPEG)
    assert tile.data.shape == original.data.shape
    assert not np.array_equal(tile.data, original.data)
    tif = damage(REAL_TIF, tmp_path / "zeroed.tif", "zeroed")
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(tif)
    assert exc.value.file == str(tif)


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


# ---------------------------------------------------------------------------------- datamodule
def _city(root: Path, real_counts: pd.DataFrame) -> None:
    """Real tiles (good and damaged copies) and real Melbourne counts with a one-day gap."""
    tiles = root / "tiles"
    tiles.mkdir()
    centre = sorted((DATA / "aid" / "Center").glob("*.jpg"))[:4]
    for i, src in enumerate(centre):
        shutil.copy(src, tiles / f"good{i}.jpg")
    shutil.copy(REAL_AIRPORT, tiles / "airport.jpg")
    for src in (REAL_JPEG, REAL_TIF):
        for how in ("truncated", "garbage"):
            damage(src, tiles / f"{how}{src.suffix}", how)
    mel = real_counts[real_counts["sensor_id"] == "mel_VAC_T"]
    gap = mel["timestamp"].str.startswith("2021-04-05")  # one day of rows dropped
    assert gap.sum() == 24
    write_rows(mel[~gap], root / "counts.csv")


def _manifest(root: Path, rows: list[str]) -> Path:
    path = root / "manifest.csv"
    path.write_text("sample_id,image,sensor_id,start,hours,label,split\n" + "\n".join(rows) + "\n")
    return path


GOOD = [
    "g1,tiles/good0.jpg,mel_VAC_T,2021-04-03T00:00:00+11:00,24,civic,train",  # line 2
    "g2,tiles/good1.jpg,mel_VAC_T,2021-04-04T00:00:00+11:00,24,civic,train",  # across fall-back
    "g3,tiles/good2.jpg,mel_VAC_T,2021-10-02T00:00:00+10:00,24,civic,val",
    "g4,tiles/good3.jpg,mel_VAC_T,2021-10-03T00:00:00+10:00,24,civic,val",  # across spring-forward
]


def _datamodule(root: Path, manifest: Path, **kwargs) -> FusionDataModule:
    return FusionDataModule(
        manifest=str(manifest),
        series=str(root / "counts.csv"),
        cache_dir="",
        image_size=28,
        bands=[1, 2, 3],  # rgbn.tif has 4 bands: read its first 3 like the JPEGs
        timezone=MELBOURNE,
        **kwargs,
    )


def test_damaged_real_inputs_through_the_datamodule(
    real_counts: pd.DataFrame, tmp_path: Path
) -> None:
    _city(tmp_path, real_counts)
    classes = ["civic", "commercial", "park", "railway_station", "residential", "school"]
    bad = [
        "b1,tiles/truncated.jpg,mel_VAC_T,2021-04-03T00:00:00+11:00,24,civic,train",  # line 6
        "b2,tiles/garbage.jpg,mel_VAC_T,2021-04-03T00:00:00+11:00,24,civic,train",  # line 7
        "b3,tiles/truncated.tif,mel_VAC_T,2021-04-03T00:00:00+11:00,24,civic,train",  # line 8
        "b4,tiles/garbage.tif,mel_VAC_T,2021-04-03T00:00:00+11:00,24,civic,train",  # line 9
        "b5,tiles/airport.jpg,,,,airport,train",  # line 10: a label outside classes
        "b6,tiles/good0.jpg,mel_VAC_T,2021-10-03T02:00:00,24,civic,train",  # line 11: DST gap
        "b7,tiles/good0.jpg,mel_VAC_T,2021-04-05T00:00:00+10:00,24,civic,train",  # line 12: gap
    ]
    manifest = _manifest(tmp_path, GOOD + bad)
    dm = _datamodule(tmp_path, manifest, classes=classes, min_present=0.0)
    with pytest.raises(InputErrors) as info:
        dm.setup()
    found = {(e.line, e.field): e for e in info.value.errors}
    expected = {
        (6, "image"): ("truncated.jpg", "cannot read image"),
        (7, "image"): ("garbage.jpg", "cannot read image"),
        (8, "image"): ("truncated.tif", "cannot read image"),
        (9, "image"): ("garbage.tif", "cannot read image"),
        (10, "label"): ("unknown label 'airport'", "civic"),
        (11, "start"): ("2021-10-03T02:00:00", "does not exist in Australia/Melbourne"),
        (12, "start"): ("no hour of the window has a count", "gap"),
    }
    assert set(found) == set(expected)
    for where, words in expected.items():
        err = found[where]
        assert err.file == str(manifest)
        for word in words:
            assert word in str(err), (where, str(err))
    # The tile's own path travels in the message.
    assert str(tmp_path / "tiles" / "garbage.tif") in found[(9, "image")].message

    # Fixed: the good rows, plus the airport tile as a val row of a listed class that no training
    # row has (documented: allowed, its class weight is 0).
    rows = [*GOOD, "v1,tiles/airport.jpg,,,,airport,val"]
    fixed = _datamodule(tmp_path, _manifest(tmp_path, rows), classes=[*classes, "airport"])
    fixed.setup()
    weights = fixed.class_weights()
    assert weights[fixed.classes.index("airport")] == 0
    assert weights[fixed.classes.index("civic")] > 0
    assert fixed.series.present[:4].all() and not fixed.series.present[4]
    # The real rows have every hour of these windows but the standard-time 02:00 of the fall-back.
    assert fixed.series.mask[:4].sum(axis=1).tolist() == [24, 23, 24, 24]


# ---------------------------------------------------------------------------------- predicting
def test_label_outside_the_models_classes(tmp_path: Path) -> None:
    from fusion.predict import ManifestSamples, ModelInputs

    inputs = ModelInputs(
        classes=("civic", "commercial", "park", "railway_station", "residential", "school"),
        band_stats=BandStats(mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0)),
        image_size=56,
        bands=None,
        nodata=None,
        hours=672,
        value_columns=("count",),
        key_column="sensor_id",
        time_column="timestamp",
        timezone=None,
        log1p=True,
        min_present=0.5,
        uses_image=True,
        uses_series=True,
    )
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "sample_id,image,sensor_id,start,hours,label\n"
        f"a,{REAL_JPEG},,,,civic\n"
        f"b,{REAL_AIRPORT},,,,airport\n"
    )
    with pytest.raises(InputErrors) as info:
        ManifestSamples(manifest, inputs)
    (err,) = info.value.errors
    assert (err.file, err.line, err.field) == (str(manifest), 3, "label")
    assert "label 'airport' is not one of the model's classes" in err.message
    # Without the unseen row the same manifest is accepted.
    manifest.write_text(f"sample_id,image,sensor_id,start,hours,label\na,{REAL_JPEG},,,,civic\n")
    samples = ManifestSamples(manifest, inputs)
    assert len(samples) == 1 and samples.labels.tolist() == [0]


DATA_INFO = {
    "classes": ["civic", "commercial", "park", "railway_station", "residential", "school"],
    "class_weights": [1.0] * 6,
    "band_stats": {"mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0]},
    "in_chans": 3,
    "image_size": 56,
    "bands": None,
    "nodata": None,
    "value_columns": ["count"],
    "n_features": 5,
    "hours": 168,
}
CONCAT = {"fusion": "concat", "vit_weights": None, "token_grid": 2}


@pytest.fixture(scope="module")
def fast_vit_init():
    """Skip timm's random ViT init (seconds on a CPU): every weight here is loaded or compared,
    never used."""
    import timm.models.vision_transformer as vision_transformer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vision_transformer, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
        yield


@pytest.fixture(scope="module")
def concat_state(fast_vit_init) -> dict[str, torch.Tensor]:
    from fusion.task import FusionTask

    return FusionTask(data_info=DATA_INFO, net=CONCAT).state_dict()


def _checkpoint(path: Path, net: dict, state: dict, **info) -> Path:
    hparams = {"data_info": {**DATA_INFO, **info}, "net": net}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def test_checkpoint_from_another_config(fast_vit_init, concat_state: dict, tmp_path: Path) -> None:
    from fusion.predict import load_model

    # The checkpoint itself is sound: with its own config it loads.
    _, inputs = load_model(_checkpoint(tmp_path / "concat.ckpt", CONCAT, concat_state))
    assert inputs.hours == 168 and inputs.in_chans == 3
    # MBT settings with concat weights.
    path = _checkpoint(tmp_path / "mbt.ckpt", {**CONCAT, "fusion": "mbt"}, concat_state)
    with pytest.raises(InputError, match="weights do not fit the checkpoint's own config") as exc:
        load_model(path)
    assert exc.value.file == str(path) and "net.fusion" in exc.value.message
    # Data facts of a 4-band model with 3-band weights.
    path = _checkpoint(tmp_path / "bands.ckpt", CONCAT, concat_state, in_chans=4)
    with pytest.raises(InputError, match="size mismatch") as exc:
        load_model(path)
    assert exc.value.file == str(path)
    # Settings this version does not know (a checkpoint from another version of the code).
    path = _checkpoint(tmp_path / "newer.ckpt", {**CONCAT, "fusion_gate": True}, concat_state)
    with pytest.raises(InputError, match="fusion_gate") as exc:
        load_model(path)
    assert exc.value.file == str(path)
