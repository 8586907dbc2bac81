"""Prediction maps: PNG over the real rasters, legend counts, reprojection, bounded reads."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon

import fusion.maps as maps
from fusion.errors import InputError
from fusion.maps import draw_prediction_map, plot_prediction_map, regions_path

CLASSES = ["school", "park", "housing"]


@pytest.fixture(scope="module")
def rgbn(shared_data: Path) -> Path:
    return shared_data / "geotiff" / "rgbn.tif"


@pytest.fixture()
def regions(shared_data: Path) -> gpd.GeoDataFrame:
    """The 252 real cells, labelled cyclically, with the first 5 left unpredicted (NaN)."""
    frame = gpd.read_file(shared_data / "geotiff" / "regions.gpkg")
    frame["pred"] = [CLASSES[i % 3] for i in range(len(frame))]
    frame.loc[frame.index[:5], "pred"] = np.nan
    return frame


def _collection_bounds(ax: plt.Axes) -> np.ndarray:
    """``(n, 4)`` data extents (x0, y0, x1, y1) of the axes' collections, in drawing order."""
    return np.array([c.get_datalim(ax.transData).extents for c in ax.collections])


def test_png_and_legend_counts(
    tmp_path: Path, rgbn: Path, regions: gpd.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Figure] = []
    boxes: dict[str, Bbox] = {}

    def keep(fig: Figure, path: Path, dpi: int = 100) -> Path:
        fig.canvas.draw()  # lay out as saved, before save_figure closes the figure
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        (ax,) = fig.axes
        boxes.update(
            figure=fig.bbox.frozen(),
            axes=ax.get_window_extent(renderer),
            legend=ax.get_legend().get_window_extent(renderer),
        )
        figures.append(fig)
        return save(fig, path, dpi)

    save = maps.save_figure
    monkeypatch.setattr(maps, "save_figure", keep)
    out = plot_prediction_map(rgbn, regions, CLASSES, tmp_path / "map.png", rgb_bands=(3, 2, 1))

    assert out == tmp_path / "map.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 400
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 1000  # the raster shows through, not a blank canvas

    (fig,) = figures
    (ax,) = fig.axes
    counts = Counter(regions["pred"].dropna())
    expected = [f"{name} ({counts[name]})" for name in CLASSES] + ["skipped (no data)"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == expected
    assert counts == {"school": 82, "park": 82, "housing": 83}
    assert ax.get_xlabel() == "x (EPSG:32618)" and ax.get_ylabel() == "y (EPSG:32618)"
    assert "rgbn.tif" in ax.get_title()
    # the legend sits to the right of the map and inside the saved figure
    assert boxes["legend"].x0 >= boxes["axes"].x1
    assert boxes["legend"].x1 <= boxes["figure"].x1 and boxes["legend"].y0 >= 0


def test_handles_without_skipped_and_unknown_labels(rgbn: Path, regions: gpd.GeoDataFrame) -> None:
    full = regions.assign(pred=[CLASSES[i % 2] for i in range(len(regions))])
    fig, ax = plt.subplots()
    try:
        handles, labels = draw_prediction_map(ax, rgbn, full, CLASSES, max_pixels=200)
        assert labels == ["school (126)", "park (126)"]  # absent class and skipped entry left out
        assert len(handles) == len(ax.collections) == 2
        full.loc[full.index[3], "pred"] = "airport"
        with pytest.raises(InputError, match="airport"):
            draw_prediction_map(ax, rgbn, full, CLASSES, max_pixels=200)
    finally:
        plt.close(fig)


def test_regions_in_other_crs_land_in_same_place(rgbn: Path, regions: gpd.GeoDataFrame) -> None:
    fig, (native, lonlat) = plt.subplots(1, 2)
    try:
        draw_prediction_map(native, rgbn, regions, CLASSES)
        draw_prediction_map(lonlat, rgbn, regions.to_crs("EPSG:4326"), CLASSES)
        a, b = _collection_bounds(native), _collection_bounds(lonlat)
    finally:
        plt.close(fig)
    assert a.shape == b.shape == (4, 4)  # three classes + skipped
    np.testing.assert_allclose(a, b, rtol=0, atol=5.0)  # within one 5 m pixel
    union = [a[:, 0].min(), a[:, 1].min(), a[:, 2].max(), a[:, 3].max()]
    np.testing.assert_allclose(union, regions.total_bounds, rtol=0, atol=1e-6)


def test_background_is_downsampled(rgbn: Path, regions: gpd.GeoDataFrame) -> None:
    fig, (small, full) = plt.subplots(1, 2)
    try:
        draw_prediction_map(small, rgbn, regions, CLASSES, max_pixels=100)
        draw_prediction_map(full, rgbn, regions, CLASSES)
        small_shape = small.images[0].get_array().shape
        full_shape = full.images[0].get_array().shape
    finally:
        plt.close(fig)
    assert max(small_shape[:2]) <= 100 and min(small_shape[:2]) >= 70
    assert full_shape[:2] == (403, 515)  # already under the default limit: read as it is


def test_nodata_is_transparent(shared_data: Path) -> None:
    raster = shared_data / "geotiff" / "landsat8_224078_20200518.tif"
    frame = gpd.read_file(shared_data / "geotiff" / "regions_landsat.gpkg").iloc[:50]
    frame["pred"] = "park"
    fig, ax = plt.subplots()
    try:
        _, labels = draw_prediction_map(
            ax, raster, frame, CLASSES, rgb_bands=(3, 2, 1), nodata=0, max_pixels=300
        )
        image = np.asarray(ax.images[0].get_array())
    finally:
        plt.close(fig)
    assert labels == ["park (50)"]
    assert max(image.shape[:2]) <= 300 and image.shape[2] == 4
    opaque = image[..., 3] > 0
    assert 0.7 < opaque.mean() < 0.95  # about 16.5% of the scene is nodata (0)


def test_regions_path_keeps_holes_and_multipolygons() -> None:
    ring = [(0, 0), (10, 0), (10, 10), (0, 10)]
    hole = [(4, 4), (6, 4), (6, 6), (4, 6)]  # same orientation as the shell: must still be a hole
    parts = [Polygon([(12, 0), (13, 0), (13, 1)]), Polygon([(14, 0), (15, 0), (15, 1)])]
    geoms = gpd.GeoSeries([Polygon(ring, [hole]), MultiPolygon(parts)])
    path = regions_path(geoms)
    assert (path.codes == path.MOVETO).sum() == 4
    fig = plt.figure(figsize=(1, 1), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.add_collection(PathCollection([path], facecolor="black", edgecolor="none"))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., 0]
    plt.close(fig)
    assert pixels[90, 10] == 0  # shell filled (row 90 is y = 1)
    assert pixels[50, 50] == 255  # hole left empty


def test_class_raster_burns_chunks_like_the_vector_map(
    rgbn: Path, regions: gpd.GeoDataFrame
) -> None:
    regions["status"] = "image only"
    regions.loc[regions.index[5:9], "status"] = "uncertain"
    chunks = [regions.iloc[i : i + 50] for i in range(0, len(regions), 50)]  # 6 chunks
    fig, ax = plt.subplots()
    _, labels = maps.draw_class_raster(ax, rgbn, iter(chunks), CLASSES, rgb_bands=(3, 2, 1))
    vector_fig, vector_ax = plt.subplots()
    _, vector_labels = draw_prediction_map(vector_ax, rgbn, regions, CLASSES, rgb_bands=(3, 2, 1))
    assert labels == vector_labels  # the same legend: classes, uncertain (4), skipped
    assert "uncertain (4)" in labels
    overlay = ax.get_images()[-1]
    image = overlay.get_array()
    left, right, bottom, top = overlay.get_extent()
    colors = maps.class_colors(len(CLASSES))
    for k in (20, 100, 200):  # a complete cell's centre has its class's colour
        cell = regions.geometry.iloc[k].centroid
        col = int((cell.x - left) / (right - left) * image.shape[1])
        row = int((top - cell.y) / (top - bottom) * image.shape[0])
        expected = colors[CLASSES.index(regions["pred"].iloc[k])]
        np.testing.assert_allclose(image[row, col, :3], expected[:3], atol=1e-6)
    uncertain = regions.geometry.iloc[6].bounds  # striped over its colour, as hatched vectors
    cols = slice(int((uncertain[0] - left) / (right - left) * image.shape[1]) + 1,
                 int((uncertain[2] - left) / (right - left) * image.shape[1]) - 1)  # fmt: skip
    rows = slice(int((top - uncertain[3]) / (top - bottom) * image.shape[0]) + 1,
                 int((top - uncertain[1]) / (top - bottom) * image.shape[0]) - 1)  # fmt: skip
    dark = np.isclose(image[rows, cols, 0], 0.1)
    assert 0.2 < dark.mean() < 0.5
    plt.close(fig)
    plt.close(vector_fig)
