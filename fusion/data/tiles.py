"""Image tiles: read GeoTIFF/JPEG/PNG into ``(C, H, W)`` arrays, band statistics, model input."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from fusion.errors import InputError

GEOTIFF_SUFFIXES = frozenset({".tif", ".tiff"})
MIN_VALID = 0.5  # default least share of a tile (or region) with data for its image to be used
PIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# PIL modes read as they are, with their numpy dtype; any other mode is converted to RGB(A).
_PIL_DTYPES = {
    "L": "uint8",
    "LA": "uint8",
    "RGB": "uint8",
    "RGBA": "uint8",
    "I;16": "uint16",
    "I;16L": "uint16",
    "I;16B": "uint16",
    "I": "int32",
    "F": "float32",
}
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
STD_FLOOR = 1e-6


@dataclass
class Tile:
    """One image: ``data`` ``(C, H, W)`` float32 in source units, ``valid`` ``(H, W)`` bool."""

    data: np.ndarray
    valid: np.ndarray
    crs: str | None
    source: str


@dataclass(frozen=True)
class TileInfo:
    """An image's header: size, band count, sample type, CRS and nodata value."""

    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    nodata: float | None


def _reason(exc: BaseException) -> str:
    """The message of ``exc`` and of the exceptions that caused it."""
    parts: list[str] = []
    cur: BaseException | None = exc
    while cur is not None and len(parts) < 4:
        text = str(cur).strip()
        if text and text not in parts:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return "; ".join(parts) or type(exc).__name__


def _check_path(path: str | PathLike[str]) -> Path:
    """``path`` as a ``Path`` that exists and has a supported image suffix."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", file=p)
    suffix = p.suffix.lower()
    if suffix not in GEOTIFF_SUFFIXES | PIL_SUFFIXES:
        known = ", ".join(sorted(GEOTIFF_SUFFIXES | PIL_SUFFIXES))
        raise InputError(f"unsupported image type '{p.suffix}' (expected one of {known})", file=p)
    return p


def open_raster(path: str | PathLike[str]) -> DatasetReader:
    """Open a GeoTIFF with rasterio; unreadable files raise ``InputError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise InputError(f"cannot read image: {_reason(exc)}", file=path) from exc


def _crs_string(crs: CRS | None) -> str | None:
    """A CRS as a short string (``"EPSG:32618"`` where possible), or ``None``."""
    return None if crs is None else crs.to_string()


def band_indexes(
    bands: Sequence[int] | None, count: int, *, file: str | PathLike[str]
) -> list[int]:
    """Validated 1-based band indexes; ``None`` means all ``count`` bands in file order."""
    if bands is None:
        return list(range(1, count + 1))
    if len(bands) == 0:
        raise InputError("no bands selected", file=file)
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, Integral) or not 1 <= b <= count:
            noun = "band" if count == 1 else "bands"
            raise InputError(f"band {b} does not exist (the image has {count} {noun})", file=file)
    return [int(b) for b in bands]


def _valid_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """``(H, W)`` bool: True where no band of ``raw`` ``(C, H, W)`` equals ``nodata`` or is NaN."""
    valid = np.ones(raw.shape[1:], dtype=bool)
    if nodata is not None and not math.isnan(nodata):
        valid &= ~np.any(raw == nodata, axis=0)
    if np.issubdtype(raw.dtype, np.floating):
        valid &= np.all(np.isfinite(raw), axis=0)
    return valid


def read_bands(
    src: DatasetReader,
    indexes: list[int],
    *,
    nodata: float | None = None,
    window: Window | None = None,
    out_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bands of an open raster: data ``(C, H, W)`` float32 and valid ``(H, W)`` bool.

    With ``nodata`` given, it replaces the file's nodata; otherwise the file's masks (nodata value,
    mask band, alpha) decide. A pixel is valid only if every selected band holds data there.
    ``out_shape`` ``(H, W)`` reads decimated (nearest neighbour, so nodata values stay exact).
    """
    shape = None if out_shape is None else (len(indexes), *out_shape)
    sampling = {"out_shape": shape, "resampling": Resampling.nearest} if shape else {}
    try:
        raw = src.read(indexes, window=window, **sampling)
        valid = _valid_mask(raw, nodata)
        if nodata is None:
            valid &= np.all(src.read_masks(indexes, window=window, **sampling) > 0, axis=0)
    except RasterioError as exc:
        raise InputError(f"cannot read image: {_reason(exc)}", file=src.name) from exc
    return raw.astype(np.float32), valid


def _pil_mode(img: Image.Image) -> str:
    """The mode to read ``img`` in: its own if numpy-friendly, else RGB or RGBA."""
    if img.mode in _PIL_DTYPES:
        return img.mode
    if img.mode == "1":
        return "L"
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    return "RGBA" if has_alpha else "RGB"


def _read_pil(path: Path) -> np.ndarray:
    """A JPEG/PNG fully decoded (truncated files raise) as ``(C, H, W)`` in its own dtype."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = _pil_mode(img)
            arr = np.asarray(img if img.mode == mode else img.convert(mode))
    except _PIL_ERRORS as exc:
        raise InputError(f"cannot read image: {_reason(exc)}", file=path) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def tile_info(path: str | PathLike[str]) -> TileInfo:
    """Read only the header of a GeoTIFF, JPEG or PNG."""
    p = _check_path(path)
    if p.suffix.lower() in GEOTIFF_SUFFIXES:
        with open_raster(p) as src:
            return TileInfo(
                width=src.width,
                height=src.height,
                count=src.count,
                dtype=str(src.dtypes[0]),
                crs=_crs_string(src.crs),
                nodata=src.nodata,
            )
    try:
        with Image.open(p) as img:
            mode = _pil_mode(img)
            count = Image.getmodebands(mode)
            width, height = img.size
    except _PIL_ERRORS as exc:
        raise InputError(f"cannot read image: {_reason(exc)}", file=p) from exc
    return TileInfo(width, height, count, _PIL_DTYPES[mode], crs=None, nodata=None)


def read_tile(
    path: str | PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
) -> Tile:
    """Read a whole GeoTIFF/JPEG/PNG as a ``Tile``.

    ``bands`` are 1-based indexes selecting and ordering bands; ``nodata`` overrides the file's
    nodata value (float NaN always counts as nodata).

    Damaged files raise ``InputError`` naming the file: truncated files, broken JPEG streams and
    GeoTIFF blocks that do not decompress. Neither format has a checksum, though: damage that still
    decodes (zeroed bytes inside a JPEG's image data, any bytes inside an uncompressed GeoTIFF's
    pixels) gives wrong pixels without an error.
    """
    p = _check_path(path)
    if p.suffix.lower() in GEOTIFF_SUFFIXES:
        with open_raster(p) as src:
            indexes = band_indexes(bands, src.count, file=p)
            data, valid = read_bands(src, indexes, nodata=nodata)
            crs = _crs_string(src.crs)
    else:
        raw = _read_pil(p)
        indexes = band_indexes(bands, raw.shape[0], file=p)
        raw = raw[[i - 1 for i in indexes]]
        data, valid, crs = raw.astype(np.float32), _valid_mask(raw, nodata), None
    if not valid.any():
        raise InputError("all pixels are nodata", file=p)
    return Tile(data=data, valid=valid, crs=crs, source=str(p))


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation for normalization (from the training split)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise InputError(
                f"band statistics need equally many means and stds, got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(m) for m in mean) or not all(s > 0 for s in std):
            raise InputError("band statistics need finite means and positive stds")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def __len__(self) -> int:
        return len(self.mean)

    @classmethod
    def accumulate(cls, tiles: Iterable[Tile]) -> BandStats:
        """Statistics over the valid pixels of ``tiles``, merged one tile at a time (float64)."""
        n, bands = 0, None
        mean = m2 = np.zeros(0)
        for tile in tiles:
            x = tile.data[:, tile.valid].astype(np.float64)
            if bands is None:
                bands = x.shape[0]
                mean, m2 = np.zeros(bands), np.zeros(bands)
            elif x.shape[0] != bands:
                raise InputError(
                    f"has {x.shape[0]} bands, earlier tiles have {bands}", file=tile.source
                )
            n_b = x.shape[1]
            if n_b == 0:
                continue
            mean_b = x.mean(axis=1)
            m2_b = np.square(x - mean_b[:, None]).sum(axis=1)
            delta = mean_b - mean
            total = n + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + np.square(delta) * (n * n_b / total)
            n = total
        if n == 0:
            raise InputError("no valid pixels to compute band statistics from")
        std = np.maximum(np.sqrt(m2 / n), STD_FLOOR)
        return cls(mean=tuple(mean.tolist()), std=tuple(std.tolist()))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-friendly form: ``{"mean": [...], "std": [...]}``."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BandStats:
        """Inverse of ``to_dict``."""
        try:
            return cls(mean=tuple(d["mean"]), std=tuple(d["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad band statistics: {exc!r}") from exc


def prepare_tile(tile: Tile, *, size: int, stats: BandStats) -> torch.Tensor:
    """Model input ``(C, size, size)`` float32: normalized, nodata set to 0, resized bilinearly."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    count, height, width = tile.data.shape
    if count != len(stats):
        raise InputError(f"has {count} bands, the model expects {len(stats)}", file=tile.source)
    x = torch.tensor(tile.data, dtype=torch.float32)
    mean = torch.tensor(stats.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(stats.std, dtype=torch.float32).view(-1, 1, 1)
    valid = torch.from_numpy(np.ascontiguousarray(tile.valid, dtype=bool))
    x = torch.where(valid, (x - mean) / std, 0.0)
    if (height, width) != (size, size):
        x = F.interpolate(
            x[None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=size < height or size < width,
        )[0]
    return x.contiguous()
