"""An overview of a manifest's data (``fusion data inspect``): rows per label and split, series
coverage and tile formats as tables, and a PNG gallery of one tile and window per class."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fusion.data.datamodule import FusionDataModule
from fusion.data.tiles import read_tile
from fusion.plots import display_rgb, save_figure


def coverage_table(dm: FusionDataModule) -> pd.DataFrame:
    """Per label: rows with a series, distinct keys, and the share of present hours (mean, min)."""
    assert dm.frame is not None and dm.classes is not None
    share = dm.series.mask.mean(axis=1) if dm.hours else np.zeros(len(dm.frame))
    frame = pd.DataFrame(
        {
            "label": [dm.classes.names[i] if i >= 0 else "(none)" for i in dm.labels],
            "key": dm.frame[dm.key_column].to_numpy(),
            "present": dm.series.present,
            "share": share,
        }
    )
    with_series = frame[frame["present"]]
    return with_series.groupby("label").agg(
        rows=("key", "size"),
        keys=("key", "nunique"),
        mean_present=("share", "mean"),
        min_present=("share", "min"),
    )


def tile_table(dm: FusionDataModule) -> pd.DataFrame:
    """Distinct tile formats: size, band count, dtype and CRS, with how many rows have each."""
    counts = Counter(
        (f"{i.width}x{i.height}", i.count, i.dtype, i.crs or "-") for i in dm.tile_infos if i
    )
    rows = [(*k, n) for k, n in counts.most_common()]
    return pd.DataFrame(rows, columns=["size", "bands", "dtype", "crs", "rows"])


def _rich(frame: pd.DataFrame, title: str, index: bool = True) -> Table:
    table = Table(title=title)
    if index:
        table.add_column(str(frame.index.name or ""), style="bold")
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for key, *values in frame.itertuples(index=True, name=None):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        table.add_row(*([str(key)] if index else []), *cells)
    return table


def write_gallery(dm: FusionDataModule, path: Path) -> Path:
    """One row per class: a training tile and its activity window (first count column)."""
    assert dm.classes is not None and dm.frame is not None
    names = dm.classes.names
    fig, axes = plt.subplots(
        len(names), 2, figsize=(12, 2.2 * len(names)), gridspec_kw={"width_ratios": [1, 4]}
    )
    axes = np.atleast_2d(axes)
    for k, name in enumerate(names):
        rows = np.flatnonzero(dm.labels == k)
        ax_img, ax_ser = axes[k]
        ax_img.set_axis_off()
        if len(rows) == 0:
            ax_ser.set_title(f"{name}: no rows")
            continue
        row = rows[0]
        sid = dm.frame["sample_id"].iloc[row]
        if dm.image_paths[row] is not None:
            tile = read_tile(dm.image_paths[row], bands=dm.bands, nodata=dm.nodata)
            ax_img.imshow(display_rgb(tile.data, tile.valid))
        ax_img.set_title(f"{name}\n{sid}", fontsize=9)
        if dm.series.present[row]:
            values = dm.series.values[row, :, 0].astype(float)
            values = np.expm1(values) if dm.hparams.log1p else values
            values[~dm.series.mask[row]] = np.nan
            ax_ser.plot(np.arange(len(values)) / 24, values, lw=0.7)
            key = dm.frame[dm.key_column].iloc[row]
            start = dm.frame["start"].iloc[row]
            ax_ser.set_title(f"{key} from {start} ({dm.hours} h)", fontsize=9)
            ax_ser.set_ylabel(dm.value_columns[0])
        else:
            ax_ser.set_title("no series", fontsize=9)
        ax_ser.set_xlabel("day of window")
        ax_ser.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def inspect(dm: FusionDataModule, output: Path, console: Console | None = None) -> None:
    """Print counts per label and split, series coverage and tile formats; write the gallery."""
    console = console or Console()
    dm.setup()
    counts = dm.split_counts()
    counts["all"] = counts.sum(axis=1)
    counts.loc["all"] = counts.sum(axis=0)
    console.print(_rich(counts, f"Rows per label and split: {dm.manifest_path}"))
    console.print(_rich(coverage_table(dm), f"Series coverage: {dm.series_path}"))
    console.print(_rich(tile_table(dm), "Tiles", index=False))
    gallery = write_gallery(dm, output / "gallery.png")
    console.print(f"gallery: {gallery}")
