"""The regions memory benchmark on a small mosaic: the mosaic repeats the real scene, the grid
has the regions asked for over the whole raster, and a measured run predicts every region."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio

from fusion.bench.regions import _markdown, measure_predict, mosaic, region_grid
from tests.conftest import TrainedRun


def test_mosaic_and_grid_cover_the_raster(shared_data: Path, tmp_path: Path) -> None:
    scene = shared_data / "geotiff" / "rgbn.tif"
    raster = mosaic(scene, tmp_path / "m.tif", 2)
    with rasterio.open(scene) as src, rasterio.open(raster) as big:
        data = src.read()
        assert (big.width, big.height) == (2 * src.width, 2 * src.height)
        assert big.crs == src.crs and big.transform.a == src.transform.a
        assert np.array_equal(big.read()[:, src.height :, src.width :], data)
        bounds = big.bounds
    grid = gpd.read_file(region_grid(raster, 300, tmp_path / "g.gpkg"))
    assert len(grid) == 300 and grid["region_id"].tolist() == list(range(300))
    assert np.allclose(grid.area, grid.area.iloc[0])  # equal rectangles
    left, bottom, right, top = grid.total_bounds
    assert left == bounds.left and right == bounds.right and top == bounds.top
    assert bounds.bottom <= bottom < bounds.top  # the last row may be partly filled


def test_a_measured_run_predicts_every_region(
    trained_run: TrainedRun, shared_data: Path, tmp_path: Path
) -> None:
    raster = mosaic(shared_data / "geotiff" / "rgbn.tif", tmp_path / "m.tif", 2)
    records = []
    for count in (50, 200):
        regions = region_grid(raster, count, tmp_path / f"g{count}.gpkg")
        out = tmp_path / f"p{count}.gpkg"
        result = measure_predict(trained_run.ckpt, raster, regions, out, None)
        assert len(gpd.read_file(out)) == count
        assert result["seconds"] > 0 and result["peak_rss_mib"] >= result["peak_anon_mib"] > 0
        records.append({"regions": count, "gdal_cachemax": "256", **result,
                        "regions_per_s": count / result["seconds"]})  # fmt: skip
    text = _markdown(pd.DataFrame(records), raster)
    assert "| 200 | 256 |" in text and "200 regions peak at" in text
