"""Peak memory of ``fusion predict`` on a regions layer against the number of regions.

The regions are **generated**: a grid of ``N`` equal rectangles over the whole raster (so every
count reads the same pixels and only the number of regions changes), written as a GeoPackage.
The raster is a mosaic of the bundle's real 4-band ``rgbn.tif`` (``tiles x tiles`` copies, a
tiled, deflate-compressed GeoTIFF; 20 x 20: 332 MB decoded), larger than ``fusion predict``'s
256 MB GDAL block cache, so the cache's cap matters. The model is the image-only ``vit`` config
trained for a few batches on 14 px tiles (one ViT patch a tile, no series branch: its
predictions mean nothing, it makes a million regions affordable on a CPU; the ViT's and the
fusion's cost per region are measured by ``--parts speed``).

Each run is the ``fusion predict`` path in a fresh process
(:func:`~fusion.bench.timing.in_fresh_process`): its peak RSS (``VmHWM``) and peak anonymous RSS
(sampled), seconds and regions/s, for each count with the command's own ``GDAL_CACHEMAX`` (256
MB), and for the smallest count also with others (``"5%"``: GDAL's own default, 5% of the
RAM). Writes ``regions.csv`` and ``regions.md``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fusion.bench.timing import in_fresh_process, memory_peaks
from fusion.configs import config_args, config_files
from fusion.io import atomic_path

TILE_SIZE = 14  # one ViT-S/14 patch a tile


def mosaic(scene: Path, path: Path, tiles: int) -> Path:
    """``scene`` repeated ``tiles x tiles`` times as one tiled, compressed GeoTIFF at ``path``
    (its pixel size and CRS, extended right and down); kept if already written."""
    import rasterio
    from rasterio.windows import Window

    if path.is_file():
        return path
    with rasterio.open(scene) as src:
        data = src.read()
        profile = src.profile | {
            "driver": "GTiff", "width": src.width * tiles, "height": src.height * tiles,
            "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
        }  # fmt: skip
        height, width = src.height, src.width
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for row in range(tiles):
            for col in range(tiles):
                dst.write(data, window=Window(col * width, row * height, width, height))
    return path


def region_grid(raster: Path, count: int, path: Path) -> Path:
    """``count`` rectangles in a near-square grid over ``raster``'s extent (its CRS), ids
    ``region_id`` 0..count-1, as the layer ``regions`` of a GeoPackage; kept if written."""
    import geopandas as gpd
    import rasterio
    import shapely

    if path.is_file():
        return path
    with rasterio.open(raster) as src:
        bounds, crs = src.bounds, src.crs
    side = int(np.ceil(np.sqrt(count)))
    xs = np.linspace(bounds.left, bounds.right, side + 1)
    ys = np.linspace(bounds.top, bounds.bottom, int(np.ceil(count / side)) + 1)
    i = np.arange(count)
    row, col = i // side, i % side
    boxes = shapely.box(xs[col], ys[row + 1], xs[col + 1], ys[row])
    frame = gpd.GeoDataFrame({"region_id": i}, geometry=boxes, crs=crs)
    with atomic_path(path) as tmp:
        tmp.unlink()
        frame.to_file(tmp, layer="regions", driver="GPKG")
    return path


def small_model(work: Path) -> Path:
    """The image-only ``vit`` config (its data and ViT weights) on 14 px tiles, trained for a
    few batches (once; reused)."""
    from fusion.training import build_cli

    ckpt = work / "model" / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    args = [
        *config_args(config_files("vit")), "--refit", "false",
        "--data.image_size", str(TILE_SIZE), "--data.cache_dir", str(work / "cache"),
        "--model.net.token_grid", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.default_root_dir", str(work / "model"), "--trainer.logger", "false",
    ]  # fmt: skip
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return ckpt


def measure_predict(
    ckpt: Path, raster: Path, regions: Path, output: Path, cachemax: str | None
) -> dict[str, Any]:
    """What ``fusion predict --raster R --regions G --bands 3 2 1 --batch-size 256 --output O``
    runs (in this process, meant to be fresh), with ``GDAL_CACHEMAX`` set to ``cachemax``
    (None: the command's cap, :func:`~fusion.predict.cap_gdal_cache`): seconds, peaks (MiB),
    the output's size (MiB)."""
    if cachemax is not None:
        os.environ["GDAL_CACHEMAX"] = cachemax
    from fusion.data.prediction import PredictionDataModule, RegionSamples
    from fusion.predict import cap_gdal_cache, load_model, predict

    cap_gdal_cache()
    with memory_peaks() as peaks:
        start = time.perf_counter()
        task, contract = load_model(ckpt)
        contract = dataclasses.replace(contract, bands=(3, 2, 1))
        samples = RegionSamples(raster, regions, contract)
        predict(task, PredictionDataModule(samples, batch_size=256), output)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, **peaks, "output_mib": output.stat().st_size / 2**20}


def run_regions_bench(
    output: Path, scene: Path, work: Path, *, counts: Sequence[int] = (100_000, 1_000_000),
    tiles: int = 20, cachemax: Sequence[str] = ("5%",),
) -> pd.DataFrame:  # fmt: skip
    """Measure every count with ``fusion predict``'s GDAL cache, and the smallest also with each
    ``cachemax`` (module docstring); write ``regions.csv`` and ``regions.md`` to ``output``."""
    work.mkdir(parents=True, exist_ok=True)
    raster = mosaic(scene, work / f"mosaic{tiles}x{tiles}.tif", tiles)
    ckpt = small_model(work)
    records = []
    for count in counts:
        regions = region_grid(raster, count, work / f"grid{count}.gpkg")
        for cache in [None, *cachemax] if count == min(counts) else [None]:
            out = work / f"pred{count}.gpkg"
            result = in_fresh_process(measure_predict, ckpt, raster, regions, out, cache)
            records.append({
                "regions": count, "gdal_cachemax": cache or "256 (fusion predict's default)",
                **result, "regions_per_s": count / result["seconds"],
            })  # fmt: skip
            print(records[-1])
    frame = pd.DataFrame(records)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "regions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(output / "regions.md") as tmp:
        tmp.write_text(_markdown(frame, raster))
    return frame


def _markdown(frame: pd.DataFrame, raster: Path) -> str:
    import rasterio

    with rasterio.open(raster) as src:
        shape = f"{src.width:,} x {src.height:,} px, {src.count} bands {src.dtypes[0]}"
    lines = [
        "# Peak memory of `fusion predict` against the number of regions "
        "(`fusion bench --parts regions`)",
        "",
        f"Generated regions (an equal-rectangle grid over the whole raster) on a mosaic of the "
        f"real rgbn.tif ({shape}; bands 3 2 1 read); the image-only vit config on {TILE_SIZE} px "
        "tiles, trained for 4 batches (its predictions mean nothing; the path's memory is "
        "measured); each run the `fusion predict` path (batch 256) to a GeoPackage in a fresh "
        "process, one run each.",
        "",
        "| regions | GDAL_CACHEMAX (MB) | seconds | regions/s | peak RSS MiB | "
        "peak anonymous MiB | output MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in frame.itertuples(index=False):
        lines.append(
            f"| {row.regions:,} | {row.gdal_cachemax} | {row.seconds:.0f} | "
            f"{row.regions_per_s:,.0f} | {row.peak_rss_mib:,.0f} | {row.peak_anon_mib:,.0f} | "
            f"{row.output_mib:,.0f} |"
        )
    for cache, rows in frame.groupby("gdal_cachemax", sort=False):
        rows = rows.sort_values("regions")
        if len(rows) > 1:
            first, last = rows.iloc[0], rows.iloc[-1]
            lines.append(
                f"\nGDAL_CACHEMAX {cache}: {last.regions:,} regions peak at "
                f"{last.peak_rss_mib / first.peak_rss_mib:.2f}x the RSS of {first.regions:,} "
                f"({last.peak_rss_mib - first.peak_rss_mib:+,.0f} MiB)."
            )
    return "\n".join(lines) + "\n"
