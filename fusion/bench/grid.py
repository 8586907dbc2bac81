"""City-scale inputs from real pixels: a raster repeated into a large mosaic, a square region grid.

Used to measure ``fusion predict`` over ~100,000 regions (time and peak memory) without a large
download: the pixels are those of a real GeoTIFF, tiled side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from fusion.io import atomic_path


def repeat_raster(
    source: str | os.PathLike[str], output: str | os.PathLike[str], reps: tuple[int, int]
) -> Path:
    """Write ``source`` tiled ``reps = (rows, cols)`` times as one GeoTIFF (same CRS, pixel size
    and origin), tiled and compressed, one copy at a time."""
    with rasterio.open(source) as src:
        data = src.read()
        profile = src.profile.copy()
        height, width = src.height, src.width
    profile.update(
        driver="GTiff",
        height=height * reps[0],
        width=width * reps[1],
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    )
    with atomic_path(output) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for i in range(reps[0]):
            for j in range(reps[1]):
                dst.write(data, window=Window(j * width, i * height, width, height))
    return Path(output)


def grid_regions(raster: str | os.PathLike[str], output: str | os.PathLike[str], cell: int) -> int:
    """Square regions of ``cell`` x ``cell`` pixels over ``raster`` (row-major ``region_id``),
    written as a GeoPackage in the raster's CRS; returns how many."""
    with rasterio.open(raster) as src:
        transform, crs = src.transform, src.crs
        rows, cols = src.height // cell, src.width // cell
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x0, y0 = transform * (c.ravel() * cell, r.ravel() * cell)
    x1, y1 = transform * ((c.ravel() + 1) * cell, (r.ravel() + 1) * cell)
    boxes = shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1),
                        np.maximum(y0, y1))  # fmt: skip
    frame = gpd.GeoDataFrame(
        {"region_id": np.arange(len(boxes)), "row": r.ravel(), "col": c.ravel()},
        geometry=boxes,
        crs=crs,
    )
    with atomic_path(output) as tmp:
        tmp.unlink()
        frame.to_file(tmp, layer="regions", driver="GPKG")
    return len(frame)
