"""The URFC city-scale benchmark on a few generated regions: the generated folder is a URFC
folder the converter reads, with the visit statistics the module states, and the measurements
return what the report prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.bench.urfc import (
    generate_urfc,
    hour_profile,
    markdown,
    measure_conversion,
    measure_filtered_read,
    measure_windows,
    visit_lines,
)
from fusion.data.series import SeriesTable
from fusion.data.urfc import CHANNELS, HOURS, URFC_CATEGORIES, read_urfc_channels


@pytest.fixture(scope="module")
def profile(shared_data: Path) -> np.ndarray:
    return hour_profile(shared_data / "footfall" / "counts.csv.gz")


def test_the_hour_profile_is_the_real_footfall_shape(profile: np.ndarray) -> None:
    assert profile.shape == (24,) and profile.sum() == pytest.approx(1.0)
    assert profile[3] < profile[13] / 5  # night against early afternoon


def test_generated_visits_follow_the_stated_statistics(profile: np.ndarray, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    users, regular = [], []
    for region in range(200):
        lines = visit_lines(rng, profile)
        path = tmp_path / f"{region:06d}_001.txt"
        path.write_text("\n".join(lines) + "\n")
        users.append(len(lines))
        days = [len(line.split("\t")[1].split(",")) for line in lines]
        regular += [d >= 7 for d in days]
        channels = read_urfc_channels(path)  # the converter reads every generated line
        assert channels[0].sum() == channels[1].sum() + channels[2].sum() > 0
    assert 22 < np.mean(users) < 28  # 1 + Poisson(24)
    assert 0.25 < np.mean(regular) < 0.35  # regulars with probability 0.3


def test_conversion_and_windows_are_measured(shared_data: Path, tmp_path: Path) -> None:
    root = generate_urfc(tmp_path / "urfc", 27, aid=shared_data / "aid",
                         counts=shared_data / "footfall" / "counts.csv.gz", workers=1)  # fmt: skip
    assert len(list((root / "train_visit").glob("*.txt"))) == 27
    assert sorted(p.name for p in (root / "train_image").iterdir()) == [
        f"{i:03d}" for i in range(1, len(URFC_CATEGORIES) + 1)
    ]
    conversion = measure_conversion(root, tmp_path / "out", workers=1)
    assert conversion["regions"] == 27 and conversion["files_per_s"] > 0
    assert conversion["peak_rss_mib"] >= conversion["peak_anon_mib"] > 0
    manifest = tmp_path / "out" / "manifest.csv"
    windows = measure_windows(manifest, tmp_path / "cache")
    assert windows["rows"] == 27 and windows["hours"] == HOURS
    # values (3 channels, float32) + mask + hour + weekday: 15 bytes an hour, plus headers.
    assert windows["windows_mib"] * 2**20 == pytest.approx(27 * HOURS * 15, rel=0.01)
    read = measure_filtered_read(tmp_path / "out" / "activity.parquet", rows=10 * HOURS,
                                 share=0.2)  # fmt: skip
    assert (read["keys"], read["keys_read"]) == (10, 2)
    assert read["whole"]["rows"] == 10 * HOURS and read["part"]["rows"] == 2 * HOURS
    table = SeriesTable.read(tmp_path / "out" / "activity.parquet", key_column="area_id",
                             value_columns=CHANNELS)  # fmt: skip
    assert table.n_rows == 27 * HOURS
    report = markdown(pd.DataFrame([{"step": "conversion", **conversion}]))
    assert report.startswith("| step | regions | seconds |") and "| conversion | 27 |" in report
