"""One reader for training and prediction: the same windows, problems raised or flagged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion.data.samples import WindowReader
from fusion.data.series import SeriesTable, parse_start
from fusion.errors import InputError


@pytest.fixture(scope="module")
def table(shared_data: Path) -> SeriesTable:
    return SeriesTable.read(shared_data / "footfall" / "counts.csv.gz")


def readers(table: SeriesTable) -> tuple[WindowReader, WindowReader]:
    settings = {"hours": 168, "n_features": 5, "key_column": "sensor_id", "min_present": 0.5,
                "log1p": True}  # fmt: skip
    return WindowReader(table, **settings), WindowReader(table, **settings, policy="flag")


def test_a_usable_window_is_the_same_under_both_policies(table: SeriesTable) -> None:
    strict, lenient = readers(table)
    start = parse_start("2022-04-05T00:00:00+10:00")
    a, b = strict.read("mel_MCEC_T", start), lenient.read("mel_MCEC_T", start)
    assert a[2] == b[2] == "" and a[1].mean() >= 0.5
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (168, 5) and a[0].dtype == np.float32


@pytest.mark.parametrize(
    ("key", "start", "field", "words"),
    [
        ("no_such_sensor", "2022-04-05T00:00:00+10:00", "sensor_id", "not found"),
        ("mel_MCEC_T", "2035-01-01T00:00:00+00:00", "sensor_id", "outside the span"),
    ],
)
def test_a_problem_is_raised_for_training_and_flagged_for_prediction(
    table: SeriesTable, key: str, start: str, field: str, words: str
) -> None:
    strict, lenient = readers(table)
    when = pd.Timestamp(start)
    with pytest.raises(InputError, match=words) as info:
        strict.read(key, when)
    assert info.value.field == field
    features, mask, note = lenient.read(key, when)
    assert words in note and not mask.any() and not features.any()


def test_no_key_is_no_series_not_a_problem(table: SeriesTable) -> None:
    strict, lenient = readers(table)
    for reader in (strict, lenient):
        _, mask, note = reader.read("", None)
        assert note == "no series" and not mask.any()
