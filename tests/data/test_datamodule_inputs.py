"""Damaged and odd real inputs through the datamodule: every bad row named at once, and the
documented handlings.

- a window with no present hour is an error for a training row whatever ``min_present`` is;
- a label with no training row but inside ``classes`` is allowed; its class weight is 0.

Covered in ``tests/data/test_datamodule.py`` and not repeated here:
``test_every_bad_input_is_reported_at_once`` (a tiny fake JPEG, label ``zebra`` outside
``classes``, a naive window start without ``timezone``, a window with 25% of its hours present),
``test_naive_series_table_needs_a_timezone``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from fusion.data.datamodule import FusionDataModule
from fusion.errors import InputErrors
from tests.conftest import DATA
from tests.data.real_inputs import (
    MELBOURNE,
    REAL_AIRPORT,
    REAL_JPEG,
    REAL_TIF,
    damage,
    write_rows,
)


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
