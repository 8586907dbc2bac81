"""The data-pipeline benchmark on real counts and the real benchmark manifest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fusion.bench.data import repeat_table, run_data_bench
from fusion.data.series import SeriesTable


def test_a_large_table_is_real_counts_under_new_keys(shared_data: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.csv"
    real = pd.read_csv(shared_data / "footfall" / "counts.csv.gz", nrows=1000)
    real.to_csv(source, index=False)
    assert repeat_table(source, tmp_path / "big.csv", 2500, key="sensor_id") == 2500
    table = SeriesTable.read(tmp_path / "big.csv")
    assert table.n_rows == 2500
    assert {k.rsplit("#", 1)[1] for k in table.keys} == {"0", "1", "2"}
    first = real["sensor_id"].iloc[0]
    assert table.span(f"{first}#0") == table.span(f"{first}#1")  # whole copies


def test_data_bench_writes_its_table(shared_data: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.csv"
    pd.read_csv(shared_data / "footfall" / "counts.csv.gz", nrows=5000).to_csv(source, index=False)
    frame = run_data_bench(
        tmp_path, manifest=shared_data / "paired" / "manifest.csv", series=source,
        train_sps=3.0, rows=12_000, image_size=56,
    )  # fmt: skip
    values = dict(zip(frame["measure"], frame["value"], strict=True))
    assert values["loader, 0 workers (samples/s)"] > 0
    assert values["series table read: rows"] == 12_000
    assert values["series table read: peak RSS (MiB)"] > 0
    assert pd.read_csv(tmp_path / "data.csv").shape == frame.shape
    assert "x training" in (tmp_path / "data.md").read_text()
