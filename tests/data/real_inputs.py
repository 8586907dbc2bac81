"""Real inputs cut from the data bundle (AID JPEGs, ``rgbn.tif``, footfall counts), and damaged
copies of them, shared by the tests of odd and damaged inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

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


def read_real_counts(shared_data: Path) -> pd.DataFrame:
    """Real footfall rows (text as in the file) of the two :data:`SENSORS`, three days around
    each 2021 DST change of their city."""
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
