"""Maps of predicted region labels drawn over a downsampled view of the source raster."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import geopandas
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch
from matplotlib.path import Path as MplPath
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.io import DatasetReader

from fusion.data.tiles import band_indexes, open_raster, read_bands
from fusion.errors import InputError
from fusion.plots import display_rgb, save_figure

FILL_ALPHA = 0.45
SKIPPED_LABEL = "skipped (no data)"
SKIPPED_COLOR = "0.45"
UNCERTAIN_STATUS = "uncertain"  # a region whose prediction is flagged (fusion.predict.Flags)


def class_colors(n: int) -> list[tuple[float, ...]]:
    """A fixed qualitative RGBA colour for each of ``n`` classes (by class index)."""
    if n <= 10:
        cmap, values = matplotlib.colormaps["tab10"], range(n)
    elif n <= 20:
        cmap, values = matplotlib.colormaps["tab20"], range(n)
    else:
        cmap, values = matplotlib.colormaps["turbo"], np.linspace(0, 1, n)
    return [tuple(float(c) for c in cmap(v)) for v in values]


def read_overview(
    src: DatasetReader,
    indexes: list[int],
    *,
    nodata: float | None = None,
    max_pixels: int = 1500,
) -> tuple[np.ndarray, np.ndarray]:
    """Bands of ``src`` downsampled so the longer side is at most ``max_pixels``.

    Returns data ``(C, h, w)`` float32 and valid ``(h, w)`` bool like
    :func:`fusion.data.tiles.read_bands`; GDAL decimates while reading (nearest neighbour, so
    nodata values stay exact), so the full-resolution raster is never held in memory.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    scale = max(src.height, src.width) / max_pixels
    if scale <= 1:
        return read_bands(src, indexes, nodata=nodata)
    shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
    return read_bands(src, indexes, nodata=nodata, out_shape=shape)


def regions_path(geoms: geopandas.GeoSeries) -> MplPath:
    """All polygons of ``geoms`` as one compound matplotlib path (holes stay holes).

    Built with vectorised shapely calls, so drawing 100,000 regions costs one artist, not one
    patch per region. Non-polygonal geometries are ignored.
    """
    parts = shapely.get_parts(np.asarray(geoms.values, dtype=object))
    parts = shapely.orient_polygons(parts[shapely.get_type_id(parts) == 3])
    coords, ring = shapely.get_coordinates(shapely.get_rings(parts), return_index=True)
    if len(coords) == 0:
        return MplPath(np.empty((0, 2)))
    codes = np.full(len(coords), MplPath.LINETO, dtype=MplPath.code_type)
    first = np.r_[True, ring[1:] != ring[:-1]]
    codes[first] = MplPath.MOVETO
    codes[np.r_[first[1:], True]] = MplPath.CLOSEPOLY
    return MplPath(coords, codes)


def class_codes(
    regions: geopandas.GeoDataFrame, classes: Sequence[str], label_column: str
) -> np.ndarray:
    """Class index per region (``-1`` where the label is missing/empty, i.e. skipped).

    Labels may be class names or integer class indexes; anything else raises ``InputError``.
    """
    if label_column not in regions.columns:
        raise InputError("label column not found in regions", field=label_column)
    values = regions[label_column]
    skipped = values.isna().to_numpy().copy()
    if not pd.api.types.is_numeric_dtype(values):
        skipped |= values.astype(str).str.strip().eq("").to_numpy()
    codes = np.full(len(values), -1, dtype=np.int64)
    given = values[~skipped]
    if pd.api.types.is_numeric_dtype(given):
        numbers = given.to_numpy(dtype=float)
        bad = (numbers != np.round(numbers)) | (numbers < 0) | (numbers >= len(classes))
        mapped = pd.Series(np.where(bad, np.nan, numbers), index=given.index)
    else:
        lookup = {name: i for i, name in enumerate(classes)}
        mapped = given.map(lambda v: lookup.get(str(v)))
    unknown = given[mapped.isna().to_numpy()]
    if len(unknown):
        shown = ", ".join(repr(v) for v in pd.unique(unknown)[:5])
        raise InputError(
            f"{len(unknown)} regions have labels that are not classes ({shown}); "
            f"classes: {', '.join(classes)}",
            field=label_column,
        )
    codes[~skipped] = mapped.to_numpy(dtype=float).astype(np.int64)
    return codes


def draw_prediction_map(
    ax: Axes,
    raster: str | os.PathLike[str],
    regions: geopandas.GeoDataFrame,
    classes: Sequence[str],
    *,
    label_column: str = "pred",
    rgb_bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = 1500,
    title: str = "",
) -> tuple[list[Patch], list[str]]:
    """Draw the raster background and the regions coloured by predicted class onto ``ax``.

    Regions are reprojected to the raster's CRS. Regions with no geometry are not drawn or
    counted. Returns the legend handles and labels (``"name (count)"`` for each class present,
    ``"uncertain (count)"`` for regions whose ``status`` column says so, hatched over their
    colour, then ``"skipped (no data)"`` if any region has no label, drawn as grey hatched
    outlines).
    """
    *_, crs = _background(ax, raster, rgb_bands, nodata, max_pixels)
    shapes, codes = _drawn(regions, classes, label_column, crs)
    colors = class_colors(len(classes))

    handles: list[Patch] = []
    labels: list[str] = []
    for k, name in enumerate(classes):
        mask = codes == k
        if not mask.any():
            continue
        face = to_rgba(colors[k], FILL_ALPHA)
        edge = to_rgba(colors[k], 0.9)
        style = {"facecolor": face, "edgecolor": edge, "linewidth": 0.4}
        ax.add_collection(PathCollection([regions_path(shapes.geometry[mask])], **style))
        handles.append(Patch(**{**style, "linewidth": 0.8}))
        labels.append(f"{name} ({int(mask.sum())})")
    if "status" in shapes.columns:  # flagged predictions keep their colour, hatched over
        uncertain = (shapes["status"] == UNCERTAIN_STATUS).to_numpy() & (codes >= 0)
        if uncertain.any():
            style = {"facecolor": "none", "edgecolor": "0.1", "hatch": "xxx", "linewidth": 0.5}
            ax.add_collection(PathCollection([regions_path(shapes.geometry[uncertain])], **style))
            handles.append(Patch(**style))
            labels.append(f"uncertain ({int(uncertain.sum())})")
    skipped = codes < 0
    if skipped.any():
        style = {"facecolor": "none", "edgecolor": SKIPPED_COLOR, "hatch": "///", "linewidth": 0.6}
        ax.add_collection(PathCollection([regions_path(shapes.geometry[skipped])], **style))
        handles.append(Patch(**style))
        labels.append(SKIPPED_LABEL)
    ax.autoscale_view()
    _finish(ax, raster, handles, labels, label_column, crs, title)
    return handles, labels


def _drawn(
    regions: geopandas.GeoDataFrame, classes: Sequence[str], label_column: str, crs: CRS | None
) -> tuple[geopandas.GeoDataFrame, np.ndarray]:
    """The regions with a geometry, in the raster's ``crs``, and their :func:`class_codes`."""
    shapes = regions[regions.geometry.notna() & ~regions.geometry.is_empty]
    if crs is not None and shapes.crs is not None and len(shapes):
        shapes = shapes.to_crs(crs)
    return shapes, class_codes(shapes, classes, label_column)


def _background(
    ax: Axes,
    raster: str | os.PathLike[str],
    rgb_bands: Sequence[int] | None,
    nodata: float | None,
    max_pixels: int,
) -> tuple[tuple[int, int], BoundingBox, CRS | None]:
    """Draw ``raster``'s overview (:func:`read_overview`) on ``ax``; its ``(h, w)``, bounds, CRS."""
    with open_raster(raster) as src:
        if rgb_bands is None:
            rgb_bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        indexes = band_indexes(rgb_bands, src.count, file=raster)
        data, valid = read_overview(src, indexes, nodata=nodata, max_pixels=max_pixels)
        bounds, crs = src.bounds, src.crs
    rgba = np.dstack([display_rgb(data, valid), valid.astype(np.float32)])
    ax.imshow(
        rgba,
        extent=(bounds.left, bounds.right, bounds.bottom, bounds.top),
        interpolation="nearest",
        zorder=0,
    )
    return valid.shape, bounds, crs


def _finish(
    ax: Axes,
    raster: str | os.PathLike[str],
    handles: list[Patch],
    labels: list[str],
    label_column: str,
    crs: CRS | None,
    title: str,
) -> None:
    """Legend, axis labels and title of a prediction map."""
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize=9,
            title=label_column,
        )
    unit = crs.to_string() if crs is not None else "pixels"
    ax.set_xlabel(f"x ({unit})")
    ax.set_ylabel(f"y ({unit})")
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.set_aspect("equal")
    ax.set_title(title or f"Predicted classes over {Path(raster).name}")


def plot_prediction_map(
    raster: str | os.PathLike[str],
    regions: geopandas.GeoDataFrame,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    label_column: str = "pred",
    rgb_bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = 1500,
    title: str = "",
) -> Path:
    """Write a PNG map of predicted region labels over ``raster`` with a legend; return its path.

    See :func:`draw_prediction_map` for the drawing; the figure is sized to the raster's aspect.
    """
    return _save_map(raster, path, lambda ax: draw_prediction_map(
        ax, raster, regions, classes, label_column=label_column, rgb_bands=rgb_bands,
        nodata=nodata, max_pixels=max_pixels, title=title,
    ))  # fmt: skip


def _save_map(
    raster: str | os.PathLike[str], path: str | os.PathLike[str], draw: Callable[[Axes], object]
) -> Path:
    """A figure sized to ``raster``'s aspect, drawn by ``draw``, saved to ``path``."""
    with open_raster(raster) as src:
        aspect = src.width / max(src.height, 1)
    width = float(np.clip(8.0 * aspect, 5.0, 16.0)) + 3.0
    fig, ax = plt.subplots(figsize=(width, 8.0), layout="constrained")
    try:
        draw(ax)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path, dpi=120)


def draw_class_raster(
    ax: Axes,
    raster: str | os.PathLike[str],
    chunks: Iterable[geopandas.GeoDataFrame],
    classes: Sequence[str],
    *,
    label_column: str = "pred",
    rgb_bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = 1500,
    title: str = "",
) -> tuple[list[Patch], list[str]]:
    """:func:`draw_prediction_map` for more regions than polygons can be drawn: the regions of
    ``chunks`` (each a frame like its ``regions``) burnt chunk by chunk into a class image on
    the raster's overview grid (a pixel takes the region covering its centre), so memory holds
    one chunk, not every polygon. Uncertain regions striped, skipped ones grey; no outlines."""
    shape, bounds, crs = _background(ax, raster, rgb_bands, nodata, max_pixels)
    grid = np.full(shape, -2, dtype=np.int16)  # -2: no region, -1: skipped, K + k: uncertain k
    transform = Affine.translation(bounds.left, bounds.top) @ Affine.scale(
        (bounds.right - bounds.left) / shape[1], (bounds.bottom - bounds.top) / shape[0]
    )
    k = len(classes)
    counts = np.zeros(2 * k + 1, dtype=np.int64)  # skipped, classes, uncertain classes
    for chunk in chunks:
        shapes, codes = _drawn(chunk, classes, label_column, crs)
        if "status" in shapes.columns:
            uncertain = (shapes["status"] == UNCERTAIN_STATUS).to_numpy() & (codes >= 0)
            codes = np.where(uncertain, codes + k, codes)
        counts += np.bincount(codes + 1, minlength=2 * k + 1)
        if len(shapes):
            rasterize(zip(shapes.geometry, codes.tolist(), strict=True), out=grid,
                      transform=transform)  # fmt: skip
    colors = np.array([to_rgba(c, FILL_ALPHA) for c in class_colors(k)] or np.zeros((0, 4)))
    rgba = np.zeros((*shape, 4), dtype=np.float32)
    plain, striped = (grid >= 0) & (grid < k), grid >= k
    rgba[plain] = colors[grid[plain]]
    rgba[striped] = colors[grid[striped] - k]
    rows, cols = np.indices(shape)
    rgba[striped & ((rows + cols) % 6 < 2)] = (0.1, 0.1, 0.1, 0.9)  # the hatching of vectors
    rgba[grid == -1] = to_rgba(SKIPPED_COLOR, FILL_ALPHA)
    ax.imshow(rgba, extent=(bounds.left, bounds.right, bounds.bottom, bounds.top),
              interpolation="nearest", zorder=1)  # fmt: skip
    handles: list[Patch] = []
    labels: list[str] = []
    for i, name in enumerate(classes):
        if counts[1 + i] + counts[1 + k + i]:
            handles.append(Patch(facecolor=colors[i], edgecolor=to_rgba(colors[i], 0.9)))
            labels.append(f"{name} ({int(counts[1 + i] + counts[1 + k + i])})")
    if counts[1 + k :].any():
        handles.append(Patch(facecolor="none", edgecolor="0.1", hatch="xxx"))
        labels.append(f"uncertain ({int(counts[1 + k :].sum())})")
    if counts[0]:
        handles.append(Patch(facecolor=to_rgba(SKIPPED_COLOR, FILL_ALPHA), hatch="///"))
        labels.append(SKIPPED_LABEL)
    _finish(ax, raster, handles, labels, label_column, crs, title)
    return handles, labels


def plot_class_raster(
    raster: str | os.PathLike[str],
    chunks: Iterable[geopandas.GeoDataFrame],
    classes: Sequence[str],
    path: str | os.PathLike[str],
    **options: object,
) -> Path:
    """:func:`plot_prediction_map` drawn by :func:`draw_class_raster` (``options``: its)."""
    return _save_map(raster, path, lambda ax: draw_class_raster(ax, raster, chunks, classes,
                                                                **options))  # fmt: skip
