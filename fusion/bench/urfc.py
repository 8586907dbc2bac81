"""URFC at city scale, on generated regions: conversion, windows on disk, training cost.

The regions are **generated** (no real URFC data ships with the project), in the URFC layout:

- tiles: real AID tiles (the first of each category folder used by the URFC tests), resized to
  100 x 100 and reused across regions;
- visit files: per region ``1 + Poisson(24)`` users; a user is a regular with probability 0.3
  (seen on 7-42 distinct days of the 182) or not (1-6 days); each day they are seen at 1-3
  hours drawn from the hour-of-day profile of the real footfall (all 76 sensors, local time).

Measured, each step in a fresh process (peaks are a process's own):

- :func:`measure_conversion`: ``fusion data urfc`` seconds, visit files/s, peak RSS of the main
  process and of its parsing workers;
- :func:`measure_windows`: the datamodule's set-up (checking tiles, building the windows on disk
  in passes of keys): seconds, peak RSS, peak anonymous RSS (sampled; RSS also counts the pages
  of memory-mapped files, which the system reclaims at will) and the windows' size on disk;
- :func:`measure_filtered_read`: reading a Parquet table whole against reading the rows of 1% of
  its keys (row groups pruned), seconds and peak RSS;
- :func:`measure_training`: training samples/s of the fused model (``mbt_mid`` with the URFC
  settings, frozen ViT tokens cached) on the same regions with 4,368-hour and 672-hour windows.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fusion.bench.timing import in_fresh_process, memory_peaks
from fusion.configs import CHECKOUT_CONFIGS
from fusion.data.urfc import URFC_CATEGORIES, URFC_FIRST_DAY, URFC_WEEKS

URFC_CONFIG = CHECKOUT_CONFIGS / "urfc.yaml"

# The AID folder each generated category takes its tile from.
AID_TILES = (
    "DenseResidential", "School", "Industrial", "RailwayStation", "Airport", "Park",
    "Commercial", "Center", "MediumResidential",
)  # fmt: skip
_DAYS = URFC_WEEKS * 7
_DATES = [(URFC_FIRST_DAY + timedelta(days=d)).strftime("%Y%m%d") for d in range(_DAYS)]


# ----------------------------------------------------------------------------------- generating


def hour_profile(counts: str | Path) -> np.ndarray:
    """Share of footfall in each local hour of the day, ``(24,)``, over every sensor of a
    long-format counts table with ISO 8601 local time stamps."""
    frame = pd.read_csv(counts, usecols=["timestamp", "count"], dtype={"timestamp": str})
    hour = frame["timestamp"].str.slice(11, 13).astype(int)
    profile = frame.groupby(hour)["count"].sum().reindex(range(24), fill_value=0).to_numpy()
    return profile / profile.sum()


def visit_lines(rng: np.random.Generator, profile: np.ndarray) -> list[str]:
    """One generated region's visit lines (see the module docstring)."""
    lines = []
    for user in range(1 + rng.poisson(24)):
        regular = rng.random() < 0.3
        n_days = int(rng.integers(7, 43) if regular else rng.integers(1, 7))
        days = np.sort(rng.choice(_DAYS, size=n_days, replace=False))
        hours = rng.choice(24, size=(n_days, 3), p=profile)  # up to 3 hours a day
        counts = rng.integers(1, 4, size=n_days)
        entries = [
            f"{_DATES[day]}&" + "|".join(f"{h:02d}" for h in np.unique(hours[i, : counts[i]]))
            for i, day in enumerate(days)
        ]
        lines.append(f"u{user:05d}\t" + ",".join(entries))
    return lines


def _write_regions(job: tuple[Path, list[str], int, np.ndarray, dict[str, bytes]]) -> None:
    root, stems, seed, profile, tiles = job
    rng = np.random.default_rng(seed)
    for stem in stems:
        category = stem[-3:]
        (root / "train_image" / category / f"{stem}.jpg").write_bytes(tiles[category])
        lines = visit_lines(rng, profile)
        (root / "train_visit" / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def generate_urfc(
    root: Path, regions: int, *, aid: Path, counts: Path, seed: int = 0, workers: int = 2
) -> Path:
    """Write ``regions`` generated training regions in the URFC layout under ``root``
    (categories in turn), in ``workers`` processes."""
    from io import BytesIO

    from PIL import Image

    profile = hour_profile(counts)
    tiles = {}
    for i, source in enumerate(AID_TILES, start=1):
        buffer = BytesIO()
        tile = next(iter(sorted((aid / source).glob("*.jpg"))))
        Image.open(tile).convert("RGB").resize((100, 100)).save(buffer, format="JPEG")
        tiles[f"{i:03d}"] = buffer.getvalue()
        (root / "train_image" / f"{i:03d}").mkdir(parents=True, exist_ok=True)
    (root / "train_visit").mkdir(parents=True, exist_ok=True)
    stems = [f"{r:06d}_{r % len(URFC_CATEGORIES) + 1:03d}" for r in range(regions)]
    chunks = [stems[i : i + 1000] for i in range(0, len(stems), 1000)]
    jobs = [(root, chunk, seed * 100_003 + k, profile, tiles) for k, chunk in enumerate(chunks)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_write_regions, jobs)
    return root


# ------------------------------------------------------------------------------------ measuring


def measure_conversion(root: Path, output: Path, workers: int = 2) -> dict[str, Any]:
    """``convert_urfc(root, output)``: seconds, files/s, peak RSS of this process and of the
    largest worker (MiB)."""
    from fusion.data.urfc import convert_urfc

    with memory_peaks() as peaks:
        start = time.perf_counter()
        done = convert_urfc(root, output, workers=workers)
        seconds = time.perf_counter() - start
    workers_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    table_mib = done.activity.stat().st_size / 2**20
    return {
        "regions": done.areas, "seconds": seconds, "files_per_s": done.areas / seconds,
        **peaks, "worker_peak_rss_mib": workers_mib, "table_mib": table_mib,
    }  # fmt: skip


def measure_windows(manifest: Path, cache: Path) -> dict[str, Any]:
    """The datamodule's set-up on a converted URFC folder (``configs/urfc.yaml``'s data
    settings, the manifest's splits), windows cached under ``cache``: seconds, peaks (MiB), the
    windows' size on disk (MiB) and the window length."""
    from fusion.data.datamodule import FusionDataModule

    urfc = yaml.safe_load(URFC_CONFIG.read_text())["data"]
    settings = {k: v for k, v in urfc.items() if k not in ("manifest", "series")}
    dm = FusionDataModule(
        manifest=str(manifest), series=str(manifest.parent / "activity.parquet"),
        cache_dir=str(cache), **settings,
    )  # fmt: skip
    with memory_peaks() as peaks:
        start = time.perf_counter()
        dm.setup()
        seconds = time.perf_counter() - start
    on_disk = sum(p.stat().st_size for p in cache.glob("series-*/*.npy")) / 2**20
    return {"rows": len(dm.frame), "hours": dm.hours, "seconds": seconds, **peaks,
            "windows_mib": on_disk}  # fmt: skip


def measure_filtered_read(
    table: Path, rows: int = 10_000_000, share: float = 0.01
) -> dict[str, Any]:
    """The first ``rows`` rows of ``table`` (a converted URFC table: row groups of whole areas)
    as a Parquet file of their own, read whole, then only the rows of ``share`` of its keys
    (each read in another process): rows kept, seconds and peaks of each."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(table)
    cut = table.with_name(f"first_{rows}.parquet")
    written = 0
    with pq.ParquetWriter(cut, source.schema_arrow) as writer:
        for group in range(source.num_row_groups):
            part = source.read_row_group(group)
            writer.write_table(part.slice(0, rows - written))
            written += min(part.num_rows, rows - written)
            if written >= rows:
                break
    keys = sorted(pq.read_table(cut, columns=["area_id"]).column(0).unique().to_pylist())
    chosen = keys[:: max(1, round(1 / share))]
    whole = in_fresh_process(_timed_read, cut, None)
    part = in_fresh_process(_timed_read, cut, chosen)
    cut.unlink()
    return {"keys": len(keys), "keys_read": len(chosen), "whole": whole, "part": part}


def _timed_read(table: Path, keys: list[str] | None) -> dict[str, Any]:
    from fusion.data.series import SeriesTable
    from fusion.data.urfc import CHANNELS

    with memory_peaks() as peaks:
        start = time.perf_counter()
        read = SeriesTable.read(table, key_column="area_id", value_columns=CHANNELS, keys=keys)
        seconds = time.perf_counter() - start
    return {"rows": read.n_rows, "seconds": seconds, **peaks}


def measure_training(manifest: Path, cache: Path, hours: int, batches: int = 12) -> dict[str, Any]:
    """Training samples/s of ``mbt_mid`` with the URFC settings on ``manifest``'s regions with
    ``hours``-hour windows, through ``fusion fit``'s own code path (frozen ViT tokens cached and
    computed before the clock starts; the first two batches untimed), one epoch of ``batches``
    batches of 32."""
    import lightning as L
    import torch

    from fusion.configs import config_args, config_files
    from fusion.training import build_cli

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, int]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
            self.stamps.append((time.perf_counter(), len(batch["label"])))

    torch.set_num_threads(2)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["hours"] = str(hours)
    cut = manifest.with_name(f"manifest_{hours}.csv")
    frame.to_csv(cut, index=False)
    files = [*config_files("mbt_mid", CHECKOUT_CONFIGS), URFC_CONFIG]
    argv = [
        *config_args(files), "--data.manifest", str(cut),
        "--data.series", str(manifest.parent / "activity.parquet"),
        "--data.cache_dir", str(cache),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(batches),
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(cache / "runs"), "--refit", "false",
    ]  # fmt: skip
    cli = build_cli(argv, run=False)
    clock = Clock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    (t0, _), *timed = clock.stamps[1:]
    samples = sum(n for _, n in timed)
    return {"hours": hours, "samples_per_s": samples / (timed[-1][0] - t0), "batches": len(timed)}


# ------------------------------------------------------------------------------------- running


def run_urfc_bench(
    output: Path,
    *,
    sizes: tuple[int, ...] = (10_000, 100_000),
    aid: Path,
    counts: Path,
    work: Path | None = None,
    training_regions: int = 1024,
) -> pd.DataFrame:
    """Every measurement above for each size in ``sizes``; writes ``urfc.csv`` and ``urfc.md``
    under ``output``. ``work``: folder for the generated data (a temporary one by default)."""
    records: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(dir=work, prefix="urfc-bench-"))
    try:
        for size in sizes:
            root = generate_urfc(folder / f"urfc_{size}", size, aid=aid, counts=counts)
            converted = folder / f"converted_{size}"
            conversion = in_fresh_process(measure_conversion, root, converted)
            records.append({"regions": size, "step": "conversion", **conversion})
            windows = in_fresh_process(measure_windows, converted / "manifest.csv",
                                       folder / f"cache_{size}")  # fmt: skip
            records.append({"regions": size, "step": "windows (datamodule set-up)", **windows})
            shutil.rmtree(folder / f"cache_{size}")
            if size == sizes[0]:
                read = in_fresh_process(measure_filtered_read, converted / "activity.parquet")
                for what in ("whole", "part"):
                    records.append({
                        "regions": size, "step": f"table read ({what}: "
                        f"{read['keys'] if what == 'whole' else read['keys_read']} keys)",
                        **read[what],
                    })  # fmt: skip
                sub = folder / "training"
                sub.mkdir()
                shutil.copy(converted / "activity.parquet", sub / "activity.parquet")
                manifest = pd.read_csv(converted / "manifest.csv", dtype=str)
                manifest = manifest.head(training_regions)
                manifest["image"] = [str((converted / p).resolve()) for p in manifest["image"]]
                manifest.to_csv(sub / "manifest.csv", index=False)
                for hours in (4368, 672):
                    train = in_fresh_process(measure_training, sub / "manifest.csv",
                                             folder / "train_cache", hours)  # fmt: skip
                    step = f"training mbt_mid, {hours} h windows"
                    records.append({"regions": training_regions, "step": step, **train})
            shutil.rmtree(root)
            shutil.rmtree(converted)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    frame = pd.DataFrame(records)
    output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output / "urfc.csv", index=False)
    (output / "urfc.md").write_text(markdown(frame))
    return frame


def markdown(frame: pd.DataFrame) -> str:
    """The measurements as a markdown table (empty cells where a step has no such measure)."""
    columns = [c for c in frame.columns if frame[c].notna().any()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame[columns].itertuples(index=False):
        cells = [
            "" if pd.isna(v) else str(v) if isinstance(v, str)
            else f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"
            for v in row
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
