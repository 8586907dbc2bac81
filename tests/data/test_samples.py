"""One window builder for training and prediction: the same windows, problems raised or flagged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.data.cache import Allocate
from fusion.data.samples import SeriesWindows, build_series_windows
from fusion.data.series import SeriesTable, encode_window, parse_start

HOURS = 168


@pytest.fixture(scope="module")
def table(shared_data: Path) -> SeriesTable:
    return SeriesTable.read(shared_data / "footfall" / "counts.csv.gz")


def in_memory(name: str, shape: tuple[int, ...], dtype: object) -> np.ndarray:
    return np.zeros(shape, dtype)


def build(table: SeriesTable, keys: list[str], starts: list[str | None]) -> SeriesWindows:
    def read_table(chosen, span) -> SeriesTable:
        return table

    allocate: Allocate = in_memory
    stamps = [None if s is None else parse_start(s) for s in starts]
    return build_series_windows(
        keys, stamps, HOURS, read_table, allocate, n_values=1, key_column="sensor_id",
        min_present=0.5, log1p=True,
    )  # fmt: skip


def test_a_usable_window_is_what_encode_window_makes_of_it(table: SeriesTable) -> None:
    start = "2022-04-05T00:00:00+10:00"
    windows = build(table, ["mel_MCEC_T"], [start])
    features, mask = windows.arrays.features(0)
    expected = encode_window(table.window("mel_MCEC_T", parse_start(start), HOURS))
    assert np.array_equal(features, expected[0]) and np.array_equal(mask, expected[1])
    assert features.shape == (HOURS, 5) and features.dtype == np.float32 and mask.mean() >= 0.5
    assert windows.problems == {} and windows.notes() == [""] and windows.keys_found == 1


def test_problems_are_raised_for_training_and_flagged_for_prediction(table: SeriesTable) -> None:
    keys = ["mel_MCEC_T", "no_such_sensor", "mel_MCEC_T", "", "mel_MCEC_T"]
    starts = [
        "2022-04-05T00:00:00+10:00", "2022-04-05T00:00:00+10:00", "2035-01-01T00:00:00+00:00",
        None, None,
    ]  # fmt: skip
    windows = build(table, keys, starts)
    assert windows.arrays.present.tolist() == [True, False, False, False, False]
    errors = windows.errors(Path("m.csv"), [2, 3, 4, 5, 6])
    assert [(e.line, e.field) for e in errors] == [(3, "sensor_id"), (4, "sensor_id")]
    assert "not found" in errors[0].message and "outside the span" in errors[1].message
    notes = windows.notes()
    assert notes[0] == "" and "not found" in notes[1] and "outside the span" in notes[2]
    assert notes[3:] == ["no series", "no series"]  # no key, or no start: not a problem
    for row in range(1, 5):  # a row without a window reads as zeros, all masked
        features, mask = windows.arrays.features(row)
        assert not features.any() and not mask.any()


def test_windows_built_in_passes_equal_one_pass(table: SeriesTable) -> None:
    keys = ["mel_MCEC_T", "akl_150_K_Road", "mel_MCEC_T", "mel_VAC_T"]
    starts = ["2022-04-05T00:00:00+10:00", "2021-03-01T00:00:00Z", "2022-05-01T00:00:00Z",
              "2021-04-01T00:00:00Z"]  # fmt: skip
    calls: list[tuple[list[str], tuple[pd.Timestamp, pd.Timestamp]]] = []

    def read_table(chosen, span) -> SeriesTable:
        calls.append((list(chosen), span))
        return table

    stamps = [parse_start(s) for s in starts]
    settings = {"n_values": 1, "key_column": "sensor_id", "min_present": 0.5, "log1p": True}
    one = build_series_windows(keys, stamps, HOURS, read_table, in_memory, **settings,
                               keys_per_pass=None)  # fmt: skip
    assert len(calls) == 1
    passes = build_series_windows(keys, stamps, HOURS, read_table, in_memory, **settings,
                                  keys_per_pass=1)  # fmt: skip
    # A pass per key, each asking for the span of that key's windows only.
    assert [c[0] for c in calls[1:]] == [["mel_MCEC_T"], ["akl_150_K_Road"], ["mel_VAC_T"]]
    assert calls[1][1] == (stamps[0], stamps[2] + pd.Timedelta(hours=HOURS - 1))
    for name in ("values", "mask", "hour", "dow", "present"):
        assert np.array_equal(getattr(one.arrays, name), getattr(passes.arrays, name))
