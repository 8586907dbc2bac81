"""The data pipeline's cost: reading a large activity table, and the loader against training.

- :func:`measure_read`: rows/s and peak memory of ``SeriesTable.read`` on a table built from real
  counts: the bundle's hourly footfall (1.3 M rows, 76 sensors) copied
  under new keys until it has the requested number of rows (:func:`repeat_table`). Reading is
  measured in a fresh process (``ru_maxrss`` is a process's lifetime peak), so earlier work in
  the benchmark does not inflate it.
- :func:`measure_loader`: samples/s of the training loader (tiles decoded and resized, series
  windows) on the real benchmark, to set against the model's training samples/s.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from fusion.bench.timing import in_fresh_process, max_rss_mib
from fusion.data.datamodule import FusionDataModule
from fusion.data.series import KEY_COLUMN, SeriesTable
from fusion.io import atomic_path


def repeat_table(
    source: str | os.PathLike[str], output: str | os.PathLike[str], rows: int, key: str
) -> int:
    """Write ``source`` (long CSV/CSV.gz) copied under keys ``<key>#<k>`` up to ``rows`` rows.

    Written one copy at a time; returns the number of rows written.
    """
    frame = pd.read_csv(source, dtype={key: "str"}, keep_default_na=False)
    written, copy = 0, 0
    with atomic_path(output) as tmp:
        while written < rows:
            part = frame.iloc[: rows - written].copy()
            part[key] = part[key] + f"#{copy}"
            part.to_csv(tmp, mode="w" if copy == 0 else "a", header=copy == 0, index=False)
            written += len(part)
            copy += 1
    return written


def _read(path: str, key: str) -> dict[str, float]:
    start = time.perf_counter()
    table = SeriesTable.read(path, key_column=key)
    seconds = time.perf_counter() - start
    return {"rows": table.n_rows, "seconds": seconds, "peak_mib": max_rss_mib()}


def measure_read(path: str | os.PathLike[str], key: str = KEY_COLUMN) -> dict[str, float]:
    """Read ``path`` in a fresh process: rows, seconds, rows/s, peak RSS and file size (MiB)."""
    result = in_fresh_process(_read, str(path), key)
    result["rows_per_s"] = result["rows"] / result["seconds"]
    result["file_mib"] = Path(path).stat().st_size / 2**20
    return result


def measure_loader(
    manifest: str | os.PathLike[str],
    *,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    batches: int = 10,
) -> float:
    """Training-loader samples/s over ``batches`` batches (after one untimed batch)."""
    dm = FusionDataModule(
        manifest=str(manifest), image_size=image_size, batch_size=batch_size,
        num_workers=num_workers,
    )  # fmt: skip
    dm.setup()
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(loader)["label"])
    return n / (time.perf_counter() - start)


def run_data_bench(
    output: Path,
    *,
    manifest: str | os.PathLike[str],
    series: str | os.PathLike[str],
    train_sps: float,
    rows: int = 10_000_000,
    image_size: int = 224,
) -> pd.DataFrame:
    """Loader samples/s (0 and 2 workers) against ``train_sps``, and reading a ``rows``-row table
    built from ``series``; writes ``data.csv`` and ``data.md`` under ``output``."""
    records = []
    for workers in (0, 2):
        loader_sps = measure_loader(manifest, image_size=image_size, num_workers=workers)
        records.append({
            "measure": f"loader, {workers} workers (samples/s)",
            "value": loader_sps,
            "ratio_to_training": loader_sps / train_sps,
        })  # fmt: skip
    records.append({"measure": "training step, mbt_mid (samples/s)", "value": train_sps,
                    "ratio_to_training": 1.0})  # fmt: skip
    if rows > 0:
        with tempfile.TemporaryDirectory() as folder:
            table = Path(folder) / "counts.csv"
            repeat_table(series, table, rows, key=KEY_COLUMN)
            read = measure_read(table)
        records += [
            {"measure": "series table read: rows", "value": read["rows"]},
            {"measure": "series table read: CSV size (MiB)", "value": read["file_mib"]},
            {"measure": "series table read: rows/s", "value": read["rows_per_s"]},
            {"measure": "series table read: seconds", "value": read["seconds"]},
            {"measure": "series table read: peak RSS (MiB)", "value": read["peak_mib"]},
        ]  # fmt: skip
    frame = pd.DataFrame.from_records(records)
    with atomic_path(output / "data.csv") as tmp:
        frame.to_csv(tmp, index=False)
    lines = ["| measure | value | x training |", "|---|---:|---:|"]
    for rec in records:
        ratio = rec.get("ratio_to_training")
        shown = "" if ratio is None else f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
        lines.append(f"| {rec['measure']} | {rec['value']:,.1f} | {shown} |")
    with atomic_path(output / "data.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return frame
