"""Tiles cut from one large GeoTIFF along region polygons (one tile per region).

A region whose geometry is missing, empty or has no area (a point, a line, a polygon collapsed
to a line) cannot be read: it gets a note in its :class:`RegionChunk`'s ``problems`` and area 0
in its ``areas``, and ``read`` raises an :class:`InputError` with that note. An invalid
polygon (e.g. a self-intersecting "bow-tie") is repaired with shapely's ``make_valid``; it is read
as repaired and keeps a note.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.io import DatasetReader
from rasterio.windows import Window

from fusion.data.tiles import Tile, band_indexes, open_raster, read_bands
from fusion.errors import InputError, InputErrors

_POLYGON_TYPES = frozenset({"Polygon", "MultiPolygon"})


CHUNK = 8192  # regions read from the layer at a time


def _layer_name(path: Path, layer: str | None) -> str:
    """The region layer of a vector file (GeoPackage, shapefile, GeoJSON ...): ``layer``, or the
    only one. A file with several layers needs ``layer``; an unknown ``layer`` is an error."""
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
    if not layers:
        raise InputError("cannot read regions: the file holds no layer", file=path)
    return layer or layers[0]


def _layer_info(path: Path, layer: str) -> dict[str, Any]:
    """pyogrio's description of a region layer (fields, CRS, feature count), which must have
    polygon geometries and at least one feature."""
    try:
        info = pyogrio.read_info(path, layer=layer, force_feature_count=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot read regions: {exc}", file=path) from exc
    if info["geometry_type"] is None:
        raise InputError("the layer has no geometries (region polygons expected)", file=path)
    if info["features"] <= 0:
        raise InputError(f"the layer '{layer}' has no features (no regions to read)", file=path)
    return info


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


@dataclass(frozen=True)
class RegionChunk:
    """Regions ``start .. start + len(ids) - 1`` of a layer, placed on the raster."""

    start: int
    ids: list[Any]
    geometries: list[Any]  # (n,) polygons in the raster CRS, repaired; degenerate ones as read
    problems: list[str]  # (n,) "" when fine, else a note (degenerate, or repaired)
    areas: np.ndarray  # (n,) area pixels are taken from (raster CRS units); 0 where degenerate
    readable: np.ndarray  # (n,) bool: a polygon with area to read
    rows: np.ndarray  # (n, 2) int: [start, stop) pixel rows of the bounding box
    cols: np.ndarray  # (n, 2) int: [start, stop) pixel columns
    outside: np.ndarray  # (n,) bool: the window misses the raster entirely

    def __len__(self) -> int:
        return len(self.ids)


class RegionRaster:
    """A large raster read one region at a time, the regions streamed from their file.

    The layer is read ``chunk`` regions at a time (pyogrio's ``skip_features`` /
    ``max_features``): once when opened, to check the ids (present, unique) and that some region
    lies on the raster, then chunk by chunk as regions are read (two chunks held per process), so
    memory does not grow with the number of regions. The polygons are reprojected to the
    raster's CRS; region ``i`` is read over its bounding box snapped to whole pixels, and pixels
    outside the raster, outside the polygon or nodata are invalid. The raster is opened lazily
    once per process, so the object can go to DataLoader workers.
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
        chunk: int = CHUNK,
    ) -> None:
        self.raster_path = Path(raster_path)
        self.regions_path = Path(regions_path)
        self.id_column = id_column
        self.nodata = nodata
        self.chunk = chunk
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

        self.layer = _layer_name(self.regions_path, layer)
        info = _layer_info(self.regions_path, self.layer)
        self.columns: list[str] = [str(c) for c in info["fields"]]  # the layer's attributes
        if id_column not in self.columns:
            raise InputError(
                f"no id column '{id_column}' (columns: {', '.join(self.columns)})",
                file=self.regions_path, field=id_column,
            )  # fmt: skip
        if info["crs"] is None:
            raise InputError(
                "regions have no CRS (cannot place them on the raster)", file=regions_path
            )
        self.layer_crs: str = str(info["crs"])  # the regions' own CRS
        self._count = int(info["features"])
        self._cached: dict[int, RegionChunk] = {}  # by start: the last two read
        self._scan()
        self._src: DatasetReader | None = None
        self._pid: int | None = None

    def _where(self, region_id: Any) -> str:
        return f"{self.id_column}={region_id}"

    def layer_rows(self, start: int, stop: int) -> gpd.GeoDataFrame:
        """Regions ``start .. stop - 1`` as the layer holds them (own CRS, all attributes):
        what outputs that keep the regions write."""
        try:
            return pyogrio.read_dataframe(
                self.regions_path, layer=self.layer, skip_features=start,
                max_features=stop - start,
            )  # fmt: skip
        except (OSError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot read regions: {exc}", file=self.regions_path) from exc

    def column(self, name: str) -> pd.Series:
        """One attribute column of the layer, whole (e.g. the key series are joined by)."""
        frame = pyogrio.read_dataframe(
            self.regions_path, layer=self.layer, columns=[name], read_geometry=False
        )
        return frame[name]

    def _place(self, start: int) -> RegionChunk:
        """The chunk of regions from ``start`` on, reprojected, repaired and windowed."""
        frame = self.layer_rows(start, min(start + self.chunk, self._count))
        ids = frame[self.id_column]
        projected = frame.geometry.to_crs(self.crs)
        parts, notes = zip(*(_polygonal(g) for g in projected), strict=True)
        readable = np.array([part is not None for part in parts], dtype=bool)
        bounds = shapely.bounds(np.array(parts, dtype=object))
        b = np.where(readable[:, None], np.nan_to_num(bounds), 0.0)
        xs, ys = b[:, [0, 2, 0, 2]], b[:, [1, 1, 3, 3]]
        cols, rows = ~self._transform @ (xs, ys)
        rows = np.stack(_snap(rows.min(axis=1), rows.max(axis=1)), axis=1)
        cols = np.stack(_snap(cols.min(axis=1), cols.max(axis=1)), axis=1)
        height, width = self._shape
        outside = readable & (
            (rows[:, 1] <= 0) | (rows[:, 0] >= height) | (cols[:, 1] <= 0) | (cols[:, 0] >= width)
        )
        kept = [g if part is None else part for g, part in zip(projected, parts, strict=True)]
        return RegionChunk(
            start=start,
            ids=ids.tolist(),
            geometries=kept,
            problems=list(notes),
            areas=np.array([0.0 if g is None else g.area for g in parts]),
            readable=readable, rows=rows, cols=cols, outside=outside,
        )  # fmt: skip

    def _scan(self) -> None:
        """Read the layer once, a chunk at a time: ids present and unique, and the degenerate
        regions and those outside the raster listed (at least one region must be readable)."""
        hashes, missing = [], 0
        degenerate: list[tuple[Any, str]] = []
        outside: list[Any] = []
        for start in range(0, self._count, self.chunk):
            part = self._place(start)
            ids = pd.Series(part.ids, dtype=object)
            missing += int(ids.isna().sum())
            hashes.append(pd.util.hash_array(ids.astype(str).to_numpy(dtype=object)))
            degenerate += [(part.ids[i], part.problems[i]) for i in np.flatnonzero(~part.readable)]
            outside += [part.ids[i] for i in np.flatnonzero(part.outside)]
            self._keep(part)  # a layer of one chunk is then not read again
        file, col = self.regions_path, self.id_column
        if missing:
            raise InputError(f"{missing} regions have no id", file=file, field=col)
        everything = np.concatenate(hashes)
        if len(np.unique(everything)) < len(everything):
            ids = self.column(self.id_column)
            dup = ids[ids.duplicated()].unique().tolist()
            shown = ", ".join(str(d) for d in dup[:10])
            raise InputError(f"duplicate region ids: {shown}", file=file, field=col)
        if len(degenerate) == self._count:
            raise InputErrors(
                InputError(note, file=file, where=self._where(region_id))
                for region_id, note in degenerate
            )
        self._degenerate = [region_id for region_id, _ in degenerate]
        self._outside_ids = outside

    def region(self, i: int) -> tuple[RegionChunk, int]:
        """The chunk holding region ``i`` (position, not id) and ``i``'s place in it; a
        process keeps the last chunk it read."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"region index {i} out of range for {len(self)} regions")
        i %= len(self)
        start = i - i % self.chunk
        if start not in self._cached:
            self._keep(self._place(start))
        return self._cached[start], i - start

    def _keep(self, part: RegionChunk) -> None:
        """Hold ``part`` and the chunk read before it: a prediction run's loader may read one
        batch ahead of the writer asking for the ids of the previous one, across a chunk's end."""
        last = list(self._cached.values())[-1:]
        self._cached = {c.start: c for c in [*last, part]}

    def region_ids(self, index: Sequence[int]) -> list[Any]:
        """The ids of the regions at positions ``index``."""
        out = []
        for i in index:
            part, j = self.region(int(i))
            out.append(part.ids[j])
        return out

    def __len__(self) -> int:
        return self._count

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
        state["_src"], state["_pid"], state["_cached"] = None, None, {}
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

    def outside(self) -> list[Any]:
        """Ids of the regions that lie entirely outside the raster (degenerate ones aside)."""
        return list(self._outside_ids)

    def degenerate(self) -> list[Any]:
        """Ids of the regions that cannot be read for their geometry (see ``problems``)."""
        return list(self._degenerate)

    def read(self, i: int) -> Tile:
        """Region ``i`` (position, not id) as a ``Tile`` over its pixel bounding box."""
        part, j = self.region(i)
        where = self._where(part.ids[j])
        if not part.readable[j]:
            raise InputError(part.problems[j], file=self.regions_path, where=where)
        (row0, row1), (col0, col1) = part.rows[j], part.cols[j]
        if part.outside[j]:
            raise InputError(
                f"region lies entirely outside the raster {self.raster_path}",
                file=self.regions_path,
                where=where,
            )
        height, width = self._shape
        r0, r1, c0, c1 = max(row0, 0), min(row1, height), max(col0, 0), min(col1, width)
        inner = Window(c0, r0, c1 - c0, r1 - r0)
        data_part, part_valid = read_bands(
            self._dataset(), self._indexes, nodata=self.nodata, window=inner
        )
        h, w = int(row1 - row0), int(col1 - col0)
        data = np.zeros((len(self._indexes), h, w), dtype=np.float32)
        valid = np.zeros((h, w), dtype=bool)
        data[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = data_part
        valid[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = part_valid
        valid &= geometry_mask(
            [part.geometries[j]],
            out_shape=(h, w),
            transform=self._transform @ Affine.translation(col0, row0),
            invert=True,
        )
        if not valid.any():
            raise InputError("all pixels are nodata", file=self.raster_path, where=where)
        return Tile(data=data, valid=valid, crs=self.crs, source=f"{self.raster_path} ({where})")
