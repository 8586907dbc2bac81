"""Tiles cut from one large GeoTIFF along region polygons (one tile per region).

A region whose geometry is missing, empty or has no area (a point, a line, a polygon collapsed
to a line) cannot be read: it gets a note in :attr:`RegionRaster.problems` and area 0 in
:attr:`RegionRaster.areas`, and ``read`` raises an :class:`InputError` with that note. An invalid
polygon (e.g. a self-intersecting "bow-tie") is repaired with shapely's ``make_valid``; it is read
as repaired and keeps a note.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.io import DatasetReader
from rasterio.windows import Window

from fusion.data.tiles import Tile, band_indexes, open_raster, read_bands
from fusion.errors import InputError, InputErrors

_POLYGON_TYPES = frozenset({"Polygon", "MultiPolygon"})


def _read_regions(path: Path, layer: str | None) -> gpd.GeoDataFrame:
    """The region layer of a vector file (GeoPackage, shapefile, GeoJSON ...).

    A file with several layers needs ``layer``; an unknown ``layer`` or a layer without features
    is an error.
    """
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        listed = pyogrio.list_layers(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot read regions: {exc}", file=path) from exc
    layers = [str(name) for name, _ in listed]
    shown = ", ".join(f"'{name}' ({kind or 'no geometry'})" for name, kind in listed)
    if layer is None and len(layers) > 1:
        raise InputError(
            f"the file has {len(layers)} layers, pick the regions' one with --layer "
            f"(layers: {shown})",
            file=path,
        )
    if layer is not None and layer not in layers:
        raise InputError(f"no layer '{layer}' in the file (layers: {shown})", file=path)
    try:
        regions = gpd.read_file(path, layer=layer)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot read regions: {exc}", file=path) from exc
    if not isinstance(regions, gpd.GeoDataFrame):
        raise InputError("the layer has no geometries (region polygons expected)", file=path)
    if len(regions) == 0:
        name = f"layer '{layer or layers[0]}'" if layers else "layer"
        raise InputError(f"the {name} has no features (no regions to read)", file=path)
    return regions


def _polygonal(geometry: Any) -> tuple[Any, str]:
    """The polygon part of a region's geometry and a note on it ("" when it is fine).

    The part is ``None`` when nothing with an area is left (then the note says why); an invalid
    geometry is repaired with ``make_valid`` (lines it collapses to are dropped).
    """
    if geometry is None:
        return None, "no geometry"
    if geometry.is_empty:
        return None, "empty geometry"
    kind, note = geometry.geom_type, ""
    if not geometry.is_valid:
        reason = str(shapely.is_valid_reason(geometry)).split("[")[0].strip().lower()
        geometry = shapely.make_valid(geometry)
        note = f"invalid geometry ({reason}), repaired with make_valid"
    if geometry.geom_type == "GeometryCollection":
        parts = [g for g in geometry.geoms if g.geom_type in _POLYGON_TYPES]
        geometry = shapely.union_all(parts) if parts else None
    if geometry is None or geometry.geom_type not in _POLYGON_TYPES or not geometry.area > 0:
        if kind in _POLYGON_TYPES:
            return None, f"zero-area geometry (a {kind} with no area)"
        return None, f"zero-area geometry (a {kind}, expected a polygon)"
    return geometry, note


def _snap(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rounded to whole pixels (halves up); at least one pixel wide."""
    start = np.floor(lo + 0.5).astype(np.int64)
    stop = np.maximum(np.floor(hi + 0.5).astype(np.int64), start + 1)
    return start, stop


class RegionRaster:
    """A large raster read one region at a time.

    The polygons are reprojected to the raster's CRS; region ``i`` is read over its bounding box
    snapped to whole pixels, and pixels outside the raster, outside the polygon or nodata are
    invalid. The raster is opened lazily once per process, so the object can go to DataLoader
    workers.
    """

    def __init__(
        self,
        raster_path: str | PathLike[str],
        regions_path: str | PathLike[str],
        *,
        id_column: str = "region_id",
        layer: str | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
    ) -> None:
        self.raster_path = Path(raster_path)
        self.regions_path = Path(regions_path)
        self.id_column = id_column
        self.nodata = nodata
        if not self.raster_path.exists():
            raise InputError("file not found", file=self.raster_path)
        with open_raster(self.raster_path) as src:
            self._indexes = band_indexes(bands, src.count, file=self.raster_path)
            self.dtype = str(src.dtypes[self._indexes[0] - 1])  # pixel type of the bands read
            self._transform = src.transform
            self._shape = (src.height, src.width)
            raster_crs = src.crs
        if raster_crs is None:
            raise InputError(
                "raster has no CRS, so regions cannot be placed on it", file=raster_path
            )
        self.crs: str = raster_crs.to_string()

        regions = _read_regions(self.regions_path, layer).reset_index(drop=True)
        self.ids: list[Any] = self._check_ids(regions)
        # The layer as read (its own CRS and attributes), for outputs that keep the regions.
        self.frame: gpd.GeoDataFrame = regions
        if regions.crs is None:
            raise InputError(
                "regions have no CRS (cannot place them on the raster)", file=regions_path
            )
        projected = regions.geometry.to_crs(raster_crs).reset_index(drop=True)
        parts, notes = zip(*(_polygonal(g) for g in projected), strict=True)
        # Per region: "" when fine, else a note (a degenerate geometry, or a repaired one).
        self.problems: list[str] = list(notes)
        self._readable = np.array([part is not None for part in parts], dtype=bool)
        # In the raster CRS, invalid polygons repaired (degenerate ones left as they were).
        self.geometries: gpd.GeoSeries = gpd.GeoSeries(
            [g if part is None else part for g, part in zip(projected, parts, strict=True)],
            crs=raster_crs,
        )
        # Area each region's pixels are taken from (raster CRS units); 0 where degenerate.
        self.areas: np.ndarray = np.array([0.0 if g is None else g.area for g in parts])
        self._check_usable()
        self._rows, self._cols = self._windows()
        self._outside = self._outside_mask()
        self._src: DatasetReader | None = None
        self._pid: int | None = None

    def _where(self, i: int) -> str:
        return f"{self.id_column}={self.ids[i]}"

    def _check_ids(self, regions: gpd.GeoDataFrame) -> list[Any]:
        """Region ids from ``id_column``: present, not missing, unique."""
        file, col = self.regions_path, self.id_column
        if col not in regions.columns:
            known = ", ".join(str(c) for c in regions.columns if c != regions.geometry.name)
            raise InputError(f"no id column '{col}' (columns: {known})", file=file, field=col)
        ids = regions[col]
        if ids.isna().any():
            raise InputError(f"{int(ids.isna().sum())} regions have no id", file=file, field=col)
        dup = ids[ids.duplicated()].unique().tolist()
        if dup:
            shown = ", ".join(str(d) for d in dup[:10])
            raise InputError(f"duplicate region ids: {shown}", file=file, field=col)
        return ids.tolist()

    def _check_usable(self) -> None:
        """At least one region must have a polygon to read."""
        if self._readable.any():
            return
        raise InputErrors(
            InputError(note, file=self.regions_path, where=self._where(i))
            for i, note in enumerate(self.problems)
        )

    def _windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per region ``[start, stop)`` pixel rows and columns, each ``(N, 2)`` int."""
        b = np.where(self._readable[:, None], self.geometries.bounds.to_numpy(), 0.0)
        xs, ys = b[:, [0, 2, 0, 2]], b[:, [1, 1, 3, 3]]
        cols, rows = ~self._transform @ (xs, ys)
        rows = np.stack(_snap(rows.min(axis=1), rows.max(axis=1)), axis=1)
        cols = np.stack(_snap(cols.min(axis=1), cols.max(axis=1)), axis=1)
        return rows, cols

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in the raster CRS's units."""
        return abs(self._transform.a * self._transform.e - self._transform.b * self._transform.d)

    @property
    def band_count(self) -> int:
        """Bands each tile has (after the ``bands`` selection)."""
        return len(self._indexes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_src"], state["_pid"] = None, None
        return state

    def _dataset(self) -> DatasetReader:
        """The raster, opened once per process."""
        if self._src is None or self._pid != os.getpid():
            self._src = open_raster(self.raster_path)
            self._pid = os.getpid()
        return self._src

    def close(self) -> None:
        """Close the raster (it reopens on the next ``read``)."""
        if self._src is not None and self._pid == os.getpid():
            self._src.close()
        self._src, self._pid = None, None

    def _outside_mask(self) -> np.ndarray:
        """``(N,)`` bool: True for regions whose pixel window misses the raster entirely."""
        height, width = self._shape
        rows, cols = self._rows, self._cols
        return self._readable & (
            (rows[:, 1] <= 0) | (rows[:, 0] >= height) | (cols[:, 1] <= 0) | (cols[:, 0] >= width)
        )

    def outside(self) -> list[Any]:
        """Ids of the regions that lie entirely outside the raster (degenerate ones aside)."""
        return [self.ids[i] for i in np.flatnonzero(self._outside)]

    def degenerate(self) -> list[Any]:
        """Ids of the regions that cannot be read for their geometry (see ``problems``)."""
        return [self.ids[i] for i in np.flatnonzero(~self._readable)]

    def read(self, i: int) -> Tile:
        """Region ``i`` (position, not id) as a ``Tile`` over its pixel bounding box."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"region index {i} out of range for {len(self)} regions")
        i %= len(self)
        if not self._readable[i]:
            raise InputError(self.problems[i], file=self.regions_path, where=self._where(i))
        (row0, row1), (col0, col1) = self._rows[i], self._cols[i]
        if self._outside[i]:
            raise InputError(
                f"region lies entirely outside the raster {self.raster_path}",
                file=self.regions_path,
                where=self._where(i),
            )
        height, width = self._shape
        r0, r1, c0, c1 = max(row0, 0), min(row1, height), max(col0, 0), min(col1, width)
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        part, part_valid = read_bands(
            self._dataset(), self._indexes, nodata=self.nodata, window=inner
        )
        h, w = int(row1 - row0), int(col1 - col0)
        data = np.zeros((len(self._indexes), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        data[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part
        valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part_valid
        valid &= geometry_mask(
            [self.geometries.iloc[i]],
            out_shape=(h, w),
            transform=self._transform @ Affine.translation(col0, row0),
            invert=True,
        )
        if not valid.any():
            raise InputError("all pixels are nodata", file=self.raster_path, where=self._where(i))
        return Tile(
            data=data, valid=valid, crs=self.crs, source=f"{self.raster_path} ({self._where(i)})"
        )
