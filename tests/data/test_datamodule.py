"""The datamodule on the real benchmark, and every bad input reported together before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from PIL import Image

from fusion.data.datamodule import FusionDataModule
from fusion.data.series import SeriesTable
from fusion.errors import InputError, InputErrors


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def benchmark(shared_data: Path, cache_dir: Path) -> FusionDataModule:
    dm = FusionDataModule(
        manifest=str(shared_data / "paired" / "manifest.csv"),
        cache_dir=str(cache_dir),
        batch_size=8,
        image_size=56,
    )
    dm.setup("fit")
    return dm


def test_benchmark_splits_and_batches(benchmark: FusionDataModule) -> None:
    dm = benchmark
    assert dm.classes is not None
    assert dm.classes.names == (
        "civic", "commercial", "park", "railway_station", "residential", "school",
    )  # fmt: skip
    counts = dm.split_counts()
    assert counts.loc["residential", "train"] == 392 and counts.loc["civic", "val"] == 83
    assert len(dm.dataset("train")) == 1428 and len(dm.dataset("val")) == 357
    assert dm.hours == 672 and dm.n_features == 5
    assert dm.series.present.all()
    assert dm.series.mask.mean() > 0.99  # the README promises >= 90% present per window
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 56, 56) and batch["image"].dtype == torch.float32
    assert batch["series"].shape == (8, 672, 5) and batch["series_mask"].shape == (8, 672)
    assert batch["series_mask"].dtype == torch.bool
    assert batch["has_image"].all() and batch["has_series"].all()
    assert ((batch["label"] >= 0) & (batch["label"] < 6)).all()
    # log1p counts in channel 0, calendar sin/cos in channels 1-4.
    assert batch["series"][..., 0].max() > 3 and batch["series"][..., 1:].abs().max() <= 1.0
    # Normalised with training statistics: roughly zero mean, unit spread.
    assert abs(batch["image"].mean().item()) < 0.5 and 0.5 < batch["image"].std().item() < 1.5


def test_band_stats_and_class_weights(benchmark: FusionDataModule) -> None:
    dm = benchmark
    assert dm.band_stats is not None and len(dm.band_stats) == 3
    assert all(40 < m < 160 for m in dm.band_stats.mean)  # uint8 aerial photos
    weights = dm.class_weights()
    counts = dm.split_counts()["train"].reindex(list(dm.classes.names)).to_numpy()
    assert torch.allclose(weights, torch.tensor(1428 / (6 * counts), dtype=torch.float32))
    assert weights.argmin() == dm.classes.index("residential")


def test_state_round_trip(benchmark: FusionDataModule, shared_data: Path) -> None:
    state = benchmark.state_dict()
    assert state["classes"][0] == "civic" and state["hours"] == 672 and state["image_size"] == 56
    fresh = FusionDataModule(manifest=str(shared_data / "paired" / "manifest.csv"))
    fresh.load_state_dict(state)
    assert fresh.classes == benchmark.classes and fresh.band_stats == benchmark.band_stats


def test_series_windows_are_cached(
    benchmark: FusionDataModule, shared_data: Path, cache_dir: Path, monkeypatch
) -> None:
    assert len(list(cache_dir.glob("series-*"))) == 1
    # On disk and memory-mapped: a sample reads its own slice.
    assert isinstance(benchmark.series.values, np.memmap)

    def no_reading(*args, **kwargs):
        raise AssertionError("the series table was read again despite the cache")

    monkeypatch.setattr(SeriesTable, "read", no_reading)
    again = FusionDataModule(
        manifest=str(shared_data / "paired" / "manifest.csv"),
        cache_dir=str(cache_dir),
        image_size=56,
    )
    again.setup()
    assert np.array_equal(again.series.values, benchmark.series.values)


def test_place_split_is_sensor_disjoint(shared_data: Path, cache_dir: Path) -> None:
    dm = FusionDataModule(
        manifest=str(shared_data / "paired" / "manifest.csv"),
        split="place",
        groups=str(shared_data / "footfall" / "sensors.csv"),
        cache_dir=str(cache_dir),
        image_size=56,
    )
    dm.setup()
    frame = dm.frame
    train = set(frame["sensor_id"][dm.splits == "train"])
    val = set(frame["sensor_id"][dm.splits == "val"])
    assert train and val and not train & val
    sensors = pd.read_csv(shared_data / "footfall" / "sensors.csv").set_index("sensor_id")
    groups_train = set(sensors.loc[list(train), "holdout_group"])
    groups_val = set(sensors.loc[list(val), "holdout_group"])
    assert not groups_train & groups_val  # nearby sensors move together
    assert dm.single_place_labels == ["park"]  # one park sensor: it cannot be held out
    assert "park" not in set(frame["label"][dm.splits == "val"])


def test_a_cross_validation_fold_holds_out_whole_places(shared_data: Path, cache_dir: Path) -> None:
    dm = FusionDataModule(
        manifest=str(shared_data / "paired" / "manifest.csv"),
        split="place",
        groups=str(shared_data / "footfall" / "sensors.csv"),
        folds=5,
        fold=2,
        seed=1,
        cache_dir=str(cache_dir),
        image_size=56,
        band_stats={"mean": [120.0, 120.0, 110.0], "std": [60.0, 55.0, 55.0]},
    )
    dm.setup()
    assert (np.flatnonzero(dm.splits == "test") == np.flatnonzero(dm.fold_of == 2)).all()
    places = {name: set(dm.groups[dm.splits == name]) for name in ("train", "val", "test")}
    assert all(places.values())
    # Test places are neither trained on nor used to choose the checkpoint or the temperature,
    # and the inner val places are not trained on.
    assert not places["test"] & (places["train"] | places["val"])
    assert not places["train"] & places["val"]
    assert dm.single_place_labels == ["park"]
    assert "park" not in set(dm.frame["label"][dm.splits == "test"])
    assert len(dm.dataset("test")) == (dm.splits == "test").sum()
    # Fixed band statistics are used as given (not computed on the training rows).
    assert dm.contract().to_dict()["band_stats"] == {
        "mean": [120.0, 120.0, 110.0],
        "std": [60.0, 55.0, 55.0],
    }


def test_inner_folds_make_every_training_place_val_once(shared_data: Path, cache_dir: Path) -> None:
    def fold(inner_fold: int) -> FusionDataModule:
        dm = FusionDataModule(
            manifest=str(shared_data / "paired" / "manifest.csv"),
            split="place", groups=str(shared_data / "footfall" / "sensors.csv"),
            folds=5, fold=1, inner_folds=3, inner_fold=inner_fold,
            cache_dir=str(cache_dir), image_size=56,
            band_stats={"mean": [120.0, 120.0, 110.0], "std": [60.0, 55.0, 55.0]},
        )  # fmt: skip
        dm.setup()
        return dm

    dms = [fold(k) for k in range(3)]
    test = dms[0].splits == "test"
    assert all((dm.splits == "test").tolist() == test.tolist() for dm in dms)  # one outer fold
    vals = [set(np.flatnonzero(dm.splits == "val").tolist()) for dm in dms]
    assert all(vals) and not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    park = (dms[0].frame["label"] == "park").to_numpy()
    assert set().union(*vals) == set(np.flatnonzero(~test & ~park).tolist())
    for dm, val in zip(dms, vals, strict=True):  # val places are never trained on
        assert not set(dm.groups[sorted(val)]) & set(dm.groups[dm.splits == "train"])
    with pytest.raises(ValueError, match="inner folds need"):
        FusionDataModule(manifest="x.csv", split="place", inner_folds=3, inner_fold=3)


def test_cross_validation_needs_a_place_or_stratified_inner_split(shared_data: Path) -> None:
    manifest = str(shared_data / "paired" / "manifest.csv")
    with pytest.raises(ValueError, match="cross-validation needs"):
        FusionDataModule(manifest=manifest, split="manifest", folds=5)
    with pytest.raises(ValueError, match="cross-validation needs"):
        FusionDataModule(manifest=manifest, split="place", folds=5, fold=5)


def test_testing_without_test_rows_is_an_error_not_the_val_rows(
    benchmark: FusionDataModule,
) -> None:
    with pytest.raises(InputError, match="no test rows: the val rows choose the checkpoint"):
        benchmark.test_dataloader()


# ---------------------------------------------------------------------- bad input
def _city(tmp_path: Path) -> Path:
    """A tiny city: RGB tiles, a few broken ones, and a counts table with offsets."""
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tiles / f"{name}.jpg")
    Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tiles / "gray.jpg")
    (tiles / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    profile = dict(driver="GTiff", width=8, height=8, count=3, dtype="uint16", nodata=0)
    with rasterio.open(tiles / "empty.tif", "w", **profile) as dst:
        dst.write(np.zeros((3, 8, 8), dtype=np.uint16))
    hours = pd.date_range("2021-03-01", periods=24 * 10, freq="h", tz="Australia/Melbourne")
    stamps = [t.isoformat() for t in hours]
    rows = [("s1", t, 10 + i % 24) for i, t in enumerate(stamps)]
    rows += [("s2", t, 5 + i % 7) for i, t in enumerate(stamps)]
    rows += [("sparse", t, 3) for i, t in enumerate(stamps) if i % 4 == 0]
    pd.DataFrame(rows, columns=["sensor_id", "timestamp", "count"]).to_csv(
        tmp_path / "counts.csv", index=False
    )
    return tmp_path


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "manifest.csv"
    header = "sample_id,image,sensor_id,start,hours,label,split\n"
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


GOOD = [
    "g1,tiles/a.jpg,s1,2021-03-01T00:00:00+11:00,48,x,train",
    "g2,tiles/b.jpg,s2,2021-03-02T00:00:00+11:00,48,y,train",
    "g3,tiles/c.jpg,s1,2021-03-03T00:00:00+11:00,48,x,val",
    "g4,tiles/d.jpg,s2,2021-03-04T00:00:00+11:00,48,y,val",
]


def _datamodule(root: Path, manifest: Path, **kwargs) -> FusionDataModule:
    return FusionDataModule(
        manifest=str(manifest),
        series=str(root / "counts.csv"),
        cache_dir=str(root / "cache"),
        image_size=16,
        batch_size=2,
        **kwargs,
    )


def test_small_city_works_and_stats_come_from_train_only(tmp_path: Path) -> None:
    root = _city(tmp_path)
    dm = _datamodule(root, _manifest(root, GOOD))
    dm.setup()
    train_pixels = np.stack([np.asarray(Image.open(root / f"tiles/{n}.jpg")) for n in "ab"])
    expected = train_pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
    assert np.allclose(dm.band_stats.mean, expected, atol=1e-3)
    batch = next(iter(dm.val_dataloader()))
    assert batch["series"].shape == (2, 48, 5) and batch["image"].shape == (2, 3, 16, 16)


def test_every_bad_input_is_reported_at_once(tmp_path: Path) -> None:
    root = _city(tmp_path)
    bad = [
        "b1,tiles/missing.jpg,s1,2021-03-01T00:00:00+11:00,48,x,train",  # line 6
        "b2,tiles/broken.jpg,s1,2021-03-01T00:00:00+11:00,48,x,train",  # line 7
        "b3,tiles/gray.jpg,s1,2021-03-01T00:00:00+11:00,48,x,train",  # line 8
        "b4,tiles/empty.tif,s1,2021-03-01T00:00:00+11:00,48,x,train",  # line 9
        "b5,tiles/a.jpg,nobody,2021-03-01T00:00:00+11:00,48,x,train",  # line 10
        "b6,tiles/a.jpg,s1,2021-03-09T00:00:00+11:00,72,x,train",  # line 11: length
        "b7,tiles/a.jpg,s1,2021-03-10T00:00:00+11:00,48,x,train",  # line 12: past the end
        "b8,tiles/a.jpg,sparse,2021-03-01T00:00:00+11:00,48,x,train",  # line 13
        "b9,tiles/a.jpg,s1,2021-03-01T00:00:00,48,x,train",  # line 14: naive start
        "b10,tiles/a.jpg,s1,2021-03-01T00:00:00+11:00,48,zebra,train",  # line 15
        "g1,tiles/a.jpg,s1,2021-03-01T00:00:00+11:00,48,x,train",  # line 16: duplicate
    ]
    manifest = _manifest(root, GOOD + bad)
    dm = _datamodule(root, manifest, classes=["x", "y"])
    with pytest.raises(InputErrors) as info:
        dm.setup()
    found = {(e.line, e.field): str(e) for e in info.value.errors}
    expected = {
        (6, "image"): "file not found",
        (7, "image"): "cannot read image",
        (8, "image"): "has 1 bands, expected 3",
        (9, "image"): "nodata",
        (10, "sensor_id"): "'nobody' not found",
        (11, "hours"): "window of 72 hours",
        (12, "sensor_id"): "outside",
        (13, "start"): "25%",
        (14, "start"): "timezone",
        (15, "label"): "unknown label 'zebra'",
        (16, "sample_id"): "duplicate sample_id 'g1'",
    }
    assert set(found) == set(expected)
    for where, text in expected.items():
        assert text in found[where], (where, found[where])
        assert str(manifest) in found[where]
    assert not (root / "cache").exists() or not list((root / "cache").iterdir())
    # The threshold is configurable: the sparse sensor passes at 20%.
    lenient = _datamodule(root, _manifest(root, [*GOOD, bad[7]]), min_present=0.2)
    lenient.setup()
    assert lenient.series.mask[4].mean() == pytest.approx(0.25)


def test_naive_series_table_needs_a_timezone(tmp_path: Path) -> None:
    root = _city(tmp_path)
    counts = pd.read_csv(root / "counts.csv")
    counts["timestamp"] = counts["timestamp"].str.slice(0, 19)
    counts.to_csv(root / "counts.csv", index=False)
    with pytest.raises(InputErrors) as info:
        _datamodule(root, _manifest(root, GOOD)).setup()
    (err,) = info.value.errors
    assert err.file.endswith("counts.csv") and err.line == 2 and "timezone" in str(err)
    fixed = _datamodule(root, _manifest(root, GOOD), timezone="Australia/Melbourne")
    fixed.setup()
    assert fixed.series.present.all()


def test_missing_series_table_is_named(tmp_path: Path) -> None:
    root = _city(tmp_path)
    dm = FusionDataModule(manifest=str(_manifest(root, GOOD)), cache_dir=str(root / "cache"))
    with pytest.raises(InputError, match="no series table"):
        dm.setup()
