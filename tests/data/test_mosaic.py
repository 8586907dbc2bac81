"""Region tiles cut from a large GeoTIFF along polygons (real rasters + region grids)."""

from __future__ import annotations

import pickle
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.windows import Window
from shapely.geometry import LineString, Polygon, box
from torch.utils.data import DataLoader, Dataset

from fusion.data.mosaic import RegionRaster
from fusion.errors import InputError, InputErrors
from tests.conftest import DATA

GEO = DATA / "geotiff"
RGBN = GEO / "rgbn.tif"
REGIONS = GEO / "regions.gpkg"
LANDSAT = GEO / "landsat8_224078_20200518.tif"
REGIONS_LANDSAT = GEO / "regions_landsat.gpkg"


@pytest.fixture(scope="module")
def grid() -> gpd.GeoDataFrame:
    return gpd.read_file(REGIONS)


@pytest.fixture(scope="module")
def rgbn() -> RegionRaster:
    return RegionRaster(RGBN, REGIONS)


def position(grid: gpd.GeoDataFrame, region_id: int) -> int:
    return int(np.flatnonzero(grid["region_id"].to_numpy() == region_id)[0])


def direct_read(bounds: tuple[float, float, float, float]) -> np.ndarray:
    """The raster pixels under an axis-aligned box, read straight with rasterio."""
    with rasterio.open(RGBN) as src:
        left, top = src.transform.c, src.transform.f
        col = round((bounds[0] - left) / 5)
        row = round((top - bounds[3]) / 5)
        width, height = round((bounds[2] - bounds[0]) / 5), round((bounds[3] - bounds[1]) / 5)
        return src.read(window=Window(col, row, width, height)).astype(np.float32)


def write_regions(path: Path, frame: gpd.GeoDataFrame) -> Path:
    frame.to_file(path, layer="regions", driver="GPKG")
    return path


def test_rgbn_grid_basics(rgbn: RegionRaster, grid: gpd.GeoDataFrame) -> None:
    assert len(rgbn) == 252
    assert rgbn.region_ids(range(252)) == grid["region_id"].tolist()
    assert rgbn.crs == "EPSG:32618"
    assert rgbn.outside() == []
    part, j = rgbn.region(251)
    assert len(part) == 252 and j == 251 and part.start == 0


def test_complete_cell_equals_direct_read(rgbn: RegionRaster, grid: gpd.GeoDataFrame) -> None:
    for region_id in (0, 40, 130):
        i = position(grid, region_id)
        assert bool(grid["complete"].iloc[i])
        tile = rgbn.read(i)
        assert tile.data.shape == (4, 30, 30) and tile.data.dtype == np.float32
        assert tile.valid.all()
        assert tile.crs == "EPSG:32618" and f"region_id={region_id}" in tile.source
        np.testing.assert_array_equal(tile.data, direct_read(grid.geometry.iloc[i].bounds))


def test_incomplete_edge_cells_are_padded(rgbn: RegionRaster, grid: gpd.GeoDataFrame) -> None:
    incomplete = grid.index[~grid["complete"]]
    assert len(incomplete) == 31
    # region 17 is on the right edge: the raster ends 25 m (5 px) into the 150 m cell
    tile = rgbn.read(position(grid, 17))
    assert tile.data.shape == (4, 30, 30)
    assert tile.valid[:, :5].all() and not tile.valid[:, 5:].any()
    # region 251 is the bottom-right corner: only the top-left part lies on the raster
    corner = rgbn.read(position(grid, 251))
    assert corner.data.shape == (4, 30, 30)
    assert 0 < corner.valid.sum() < 30 * 30 and corner.valid[0, 0] and not corner.valid[-1, -1]
    for i in incomplete:
        assert not rgbn.read(int(i)).valid.all()


def test_regions_in_other_crs_give_same_tile(
    rgbn: RegionRaster, grid: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    path = write_regions(tmp_path / "wgs84.gpkg", grid.to_crs("EPSG:4326"))
    lonlat = RegionRaster(RGBN, path)
    assert lonlat.crs == "EPSG:32618" and len(lonlat) == 252
    i = position(grid, 60)
    ref, got = rgbn.read(i), lonlat.read(i)
    assert all(abs(a - b) <= 1 for a, b in zip(got.data.shape, ref.data.shape, strict=True))
    assert got.valid[1:-1, 1:-1].all()
    np.testing.assert_array_equal(got.data[:, 1:29, 1:29], ref.data[:, 1:29, 1:29])


def test_region_outside_raster_raises(grid: gpd.GeoDataFrame, tmp_path: Path) -> None:
    far = gpd.GeoDataFrame(
        {"region_id": [999], "row": [0], "col": [0], "cell_m": [150.0], "complete": [False]},
        geometry=[box(900000, 2050000, 900150, 2050150)],
        crs=grid.crs,
    )
    path = write_regions(tmp_path / "far.gpkg", pd.concat([grid, far], ignore_index=True))
    regions = RegionRaster(RGBN, path)
    assert regions.outside() == [999]
    with pytest.raises(InputError, match="entirely outside the raster") as exc:
        regions.read(len(regions) - 1)
    assert exc.value.where == "region_id=999"
    assert str(path) in str(exc.value) and str(RGBN) in str(exc.value)
    assert regions.read(0).valid.all()  # the others still read


def test_polygon_mask_for_non_square_region(tmp_path: Path) -> None:
    left, top = 792988.0 + 50, 2050382.0 - 50
    triangle = Polygon([(left, top), (left, top - 100), (left + 100, top - 100)])
    frame = gpd.GeoDataFrame({"region_id": ["tri"]}, geometry=[triangle], crs="EPSG:32618")
    tile = RegionRaster(RGBN, write_regions(tmp_path / "tri.gpkg", frame)).read(0)
    assert tile.data.shape == (4, 20, 20)
    assert tile.valid[-1, 0] and not tile.valid[0, -1]
    assert 180 <= tile.valid.sum() <= 220  # about half of 20x20
    assert np.array_equal(tile.valid, np.tril(np.ones((20, 20), bool)) & tile.valid)


def test_bad_region_files_raise(grid: gpd.GeoDataFrame, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="'crs' was not provided"):
        no_crs = write_regions(tmp_path / "nocrs.gpkg", grid.set_crs(None, allow_override=True))
    with pytest.raises(InputError, match="no CRS") as exc:
        RegionRaster(RGBN, no_crs)
    assert exc.value.file == str(no_crs)

    with pytest.raises(InputError, match="no id column 'cell'") as exc:
        RegionRaster(RGBN, REGIONS, id_column="cell")
    assert exc.value.file == str(REGIONS) and exc.value.field == "cell"

    dup = grid.copy()
    dup.loc[dup.index[5], "region_id"] = 3
    dup_path = write_regions(tmp_path / "dup.gpkg", dup)
    with pytest.raises(InputError, match="duplicate region ids: 3") as exc:
        RegionRaster(RGBN, dup_path)
    assert exc.value.file == str(dup_path)

    with pytest.raises(InputError, match="file not found"):
        RegionRaster(RGBN, tmp_path / "missing.gpkg")
    with pytest.raises(InputError, match="band 5"):
        RegionRaster(RGBN, REGIONS, bands=[5])

    table = tmp_path / "table.csv"
    table.write_text("region_id,x\n1,2\n")
    with pytest.raises(InputError, match="no geometries"):
        RegionRaster(RGBN, table)
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"not a geopackage" * 64)
    with pytest.raises(InputError, match="cannot read regions") as exc:
        RegionRaster(RGBN, junk)
    assert exc.value.file == str(junk)


def test_band_selection_and_pickling(rgbn: RegionRaster, grid: gpd.GeoDataFrame) -> None:
    i = position(grid, 40)
    ref = rgbn.read(i)  # the raster handle is open now
    swapped = RegionRaster(RGBN, REGIONS, bands=[3, 2, 1]).read(i)
    np.testing.assert_array_equal(swapped.data, ref.data[[2, 1, 0]])
    clone = pickle.loads(pickle.dumps(rgbn))
    np.testing.assert_array_equal(clone.read(i).data, ref.data)
    clone.close()
    np.testing.assert_array_equal(clone.read(i).data, ref.data)  # reopens after close


class RegionTensors(Dataset):
    """Map-style view of a ``RegionRaster`` for a DataLoader."""

    def __init__(self, regions: RegionRaster, positions: list[int]) -> None:
        self.regions, self.positions = regions, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.regions.read(self.positions[k]).data)


def test_reads_in_dataloader_workers(rgbn: RegionRaster) -> None:
    positions = [0, 40, 130, 17]
    expected = torch.stack([torch.from_numpy(rgbn.read(i).data) for i in positions])
    # fork: the worker inherits the parent's open handle and must reopen it (spawn goes through
    # pickling, covered above)
    loader = DataLoader(
        RegionTensors(rgbn, positions), batch_size=2, num_workers=1, multiprocessing_context="fork"
    )
    assert torch.equal(torch.cat(list(loader)), expected)


def test_landsat_regions_with_nodata() -> None:
    grid = gpd.read_file(REGIONS_LANDSAT)
    regions = RegionRaster(LANDSAT, REGIONS_LANDSAT, nodata=0)
    assert len(regions) == 1558 and regions.crs == "EPSG:32621"
    frac = grid["valid_frac"].to_numpy()
    full = int(np.flatnonzero((frac == 1) & grid["complete"].to_numpy())[0])
    tile = regions.read(full)
    assert tile.data.shape == (3, 50, 50) and tile.valid.all()
    assert tile.data.max() > 255
    for i in np.flatnonzero((frac > 0) & (frac < 1))[:5]:
        part = regions.read(int(i))
        assert part.data.shape == (3, 50, 50)
        assert part.valid.mean() == pytest.approx(frac[i], abs=0.01)
    empty = int(np.flatnonzero(frac == 0)[0])
    with pytest.raises(InputError, match="all pixels are nodata") as exc:
        regions.read(empty)
    assert exc.value.where == f"region_id={grid['region_id'].iloc[empty]}"


# --- degenerate geometries, layers and empty layers (small hand-made files) -------------------

CRS = "EPSG:32618"


@pytest.fixture
def tiny_raster(tmp_path: Path) -> Path:
    """A 20 x 20 raster of 1 m pixels over (0, 0)-(20, 20), every pixel 1."""
    path = tmp_path / "tiny.tif"
    profile = {
        "driver": "GTiff", "width": 20, "height": 20, "count": 1, "dtype": "uint8", "crs": CRS,
        "transform": rasterio.Affine(1, 0, 0, 0, -1, 20),
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 20, 20), dtype=np.uint8))
    return path


BOW_TIE = Polygon([(10, 10), (18, 18), (18, 10), (10, 18)])  # two 16 m² triangles, area 0 as drawn


def test_degenerate_regions_are_flagged_not_divided_by(tiny_raster: Path, tmp_path: Path) -> None:
    geometries = [
        box(2, 2, 8, 8),
        BOW_TIE,
        LineString([(0, 0), (5, 5)]),
        Polygon([(0, 0), (5, 0), (10, 0)]),  # collapsed to a line
        Polygon(),
        None,
    ]
    frame = gpd.GeoDataFrame({"region_id": list(range(1, 7))}, geometry=geometries, crs=CRS)
    regions = RegionRaster(tiny_raster, write_regions(tmp_path / "odd.gpkg", frame))
    part, _ = regions.region(0)
    assert BOW_TIE.area == 0  # what dividing by the drawn area would have met
    assert part.problems == [
        "",
        "invalid geometry (self-intersection), repaired with make_valid",
        "zero-area geometry (a LineString, expected a polygon)",
        "zero-area geometry (a Polygon with no area)",
        "empty geometry",
        "no geometry",
    ]
    np.testing.assert_allclose(part.areas, [36, 32, 0, 0, 0, 0])
    assert regions.degenerate() == [3, 4, 5, 6] and regions.outside() == []
    assert regions.read(0).valid.sum() == 36
    bow = regions.read(1)  # read along the repaired polygon
    share = bow.valid.sum() * regions.pixel_area / part.areas[1]
    assert 0.5 < share <= 1.25 and bow.valid.sum() < bow.valid.size
    for i, note in [(2, "zero-area"), (3, "zero-area"), (4, "empty geometry"), (5, "no geometry")]:
        with pytest.raises(InputError, match=note) as exc:
            regions.read(i)
        assert exc.value.where == f"region_id={i + 1}" and exc.value.file == str(
            regions.regions_path
        )
    assert len(regions.layer_rows(0, 6)) == 6  # the layer as read, for outputs


def test_only_degenerate_regions_raise(tiny_raster: Path, tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame(
        {"region_id": ["a", "b"]}, geometry=[LineString([(0, 0), (5, 5)]), Polygon()], crs=CRS
    )
    with pytest.raises(InputErrors) as exc:
        RegionRaster(tiny_raster, write_regions(tmp_path / "lines.gpkg", frame))
    assert [e.where for e in exc.value.errors] == ["region_id=a", "region_id=b"]
    assert "zero-area geometry" in str(exc.value) and "empty geometry" in str(exc.value)


def test_several_layers_need_a_layer(tiny_raster: Path, tmp_path: Path) -> None:
    path = tmp_path / "city.gpkg"
    squares = gpd.GeoDataFrame({"region_id": [1, 2]}, geometry=[box(0, 0, 5, 5), box(5, 5, 9, 9)])
    squares.set_crs(CRS).to_file(path, layer="blocks")
    roads = gpd.GeoDataFrame({"region_id": [1]}, geometry=[LineString([(0, 0), (9, 9)])], crs=CRS)
    roads.to_file(path, layer="roads")
    with pytest.raises(InputError, match="2 layers") as exc:
        RegionRaster(tiny_raster, path)
    assert exc.value.file == str(path)
    assert "'blocks' (Polygon)" in str(exc.value) and "'roads' (LineString)" in str(exc.value)
    assert "--layer" in str(exc.value)
    with pytest.raises(InputError, match="no layer 'parcels'") as exc:
        RegionRaster(tiny_raster, path, layer="parcels")
    assert "'blocks'" in str(exc.value) and "'roads'" in str(exc.value)
    assert RegionRaster(tiny_raster, path, layer="blocks").region_ids([0, 1]) == [1, 2]


def test_layer_without_features(tiny_raster: Path, tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame({"region_id": [1]}, geometry=[box(0, 0, 5, 5)], crs=CRS)
    path = write_regions(tmp_path / "none.gpkg", frame.iloc[:0])
    with pytest.raises(InputError, match="layer 'regions' has no features") as exc:
        RegionRaster(tiny_raster, path)
    assert exc.value.file == str(path)


def test_regions_streamed_in_chunks_read_as_one(
    rgbn: RegionRaster, grid: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    small = RegionRaster(RGBN, REGIONS, chunk=50)  # 252 regions: 6 chunks, the last of 2
    assert len(small) == 252 and small.region_ids([0, 49, 50, 251]) == [0, 49, 50, 251]
    for i in (0, 49, 50, 130, 251):
        np.testing.assert_array_equal(small.read(i).data, rgbn.read(i).data)
        np.testing.assert_array_equal(small.read(i).valid, rgbn.read(i).valid)
        part, j = small.region(i)
        assert part.start == 50 * (i // 50) and j == i % 50 and len(part) <= 50
    assert len(small.region(251)[0]) == 2

    dup = grid.copy()
    dup.loc[dup.index[200], "region_id"] = 3  # a duplicate of a region three chunks earlier
    path = write_regions(tmp_path / "dup.gpkg", dup)
    with pytest.raises(InputError, match="duplicate region ids: 3"):
        RegionRaster(RGBN, path, chunk=50)
    far = grid.copy()
    far.loc[far.index[230], "geometry"] = box(900000, 2050000, 900150, 2050150)
    far.loc[far.index[5], "geometry"] = LineString([(0, 0), (5, 5)])
    path = write_regions(tmp_path / "far.gpkg", far)
    streamed = RegionRaster(RGBN, path, chunk=50)
    assert streamed.outside() == [230] and streamed.degenerate() == [5]
