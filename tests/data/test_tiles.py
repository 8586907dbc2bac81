"""Tile reading (GeoTIFF/JPEG/PNG), band statistics and model-input preparation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image, ImageFile

from fusion.data.tiles import BandStats, Tile, prepare_tile, read_tile, tile_info
from fusion.errors import InputError
from tests.conftest import DATA
from tests.data.real_inputs import REAL_JPEG, damage

AID = DATA / "aid"
RGBN = DATA / "geotiff" / "rgbn.tif"
LANDSAT = DATA / "geotiff" / "landsat8_224078_20200518.tif"


def aid_paths(n: int) -> list[Path]:
    """``n`` AID tiles from different classes."""
    with (AID / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [AID / r["path"] for r in rows[:: len(rows) // n][:n]]


def write_tif(path: Path, arr: np.ndarray, *, nodata: float | None = None) -> Path:
    """A small georeferenced GeoTIFF of ``arr`` ``(C, H, W)``."""
    count, height, width = arr.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=arr.dtype,
        crs="EPSG:32618",
        transform=Affine(5, 0, 793000, 0, -5, 2050000),
        nodata=nodata,
    ) as dst:
        dst.write(arr)
    return path


def rgb_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- real AID JPEGs ---------------------------------------------------------------------------


def test_read_aid_jpegs_match_pil() -> None:
    for path in aid_paths(4):
        tile = read_tile(path)
        assert tile.data.shape == (3, 150, 150)
        assert tile.data.dtype == np.float32
        assert tile.data.min() >= 0 and tile.data.max() <= 255
        assert tile.data.std() > 1  # a real picture, not a constant fill
        assert tile.valid.shape == (150, 150) and tile.valid.all()
        assert tile.crs is None and tile.source == str(path)
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(tile.data, expected)


def test_aid_tile_info() -> None:
    info = tile_info(aid_paths(1)[0])
    assert (info.width, info.height, info.count, info.dtype) == (150, 150, 3, "uint8")
    assert info.crs is None and info.nodata is None


def test_band_selection_reverses_channels() -> None:
    path = aid_paths(1)[0]
    plain = read_tile(path)
    reversed_ = read_tile(path, bands=[3, 2, 1])
    np.testing.assert_array_equal(reversed_.data, plain.data[::-1])
    assert not np.array_equal(reversed_.data, plain.data)
    np.testing.assert_array_equal(read_tile(path, bands=[2]).data, plain.data[1:2])


# --- real GeoTIFFs ----------------------------------------------------------------------------


def test_read_rgbn_whole() -> None:
    tile = read_tile(RGBN)
    assert tile.data.shape == (4, 403, 515)
    assert tile.crs == "EPSG:32618"
    assert tile.valid.all()
    with rasterio.open(RGBN) as src:
        np.testing.assert_array_equal(tile.data, src.read().astype(np.float32))
    info = tile_info(RGBN)
    assert (info.width, info.height, info.count, info.dtype) == (515, 403, 4, "uint8")
    assert info.crs == "EPSG:32618" and info.nodata is None


def test_read_landsat_with_nodata_override() -> None:
    tile = read_tile(LANDSAT, nodata=0)
    assert tile.data.shape == (3, 1860, 2041)
    assert tile.crs == "EPSG:32621"
    assert 0.8 < tile.valid.mean() < 0.9  # README: about 16.5% nodata
    assert tile.data[:, tile.valid].max() > 255  # uint16 range kept
    assert (tile.data[:, tile.valid] > 0).all()
    assert tile_info(LANDSAT).dtype == "uint16"


# --- generated GeoTIFFs -----------------------------------------------------------------------


def test_uint16_geotiff_with_file_nodata(tmp_path: Path) -> None:
    arr = np.full((2, 6, 8), 40000, dtype=np.uint16)
    arr[1] = 1234
    arr[0, 2, 3] = 65535  # nodata in one band is enough to drop the pixel
    arr[:, 5, 7] = 65535
    path = write_tif(tmp_path / "u16.tif", arr, nodata=65535)
    tile = read_tile(path)
    assert tile.data.shape == (2, 6, 8) and tile.data.dtype == np.float32
    assert tile.data[0, 0, 0] == 40000 and tile.data[1, 0, 0] == 1234
    assert not tile.valid[2, 3] and not tile.valid[5, 7]
    assert tile.valid.sum() == 6 * 8 - 2
    assert tile_info(path).nodata == 65535
    assert read_tile(path, bands=[2]).data.shape == (1, 6, 8)


def test_nodata_override_on_file_without_nodata(tmp_path: Path) -> None:
    arr = np.arange(1, 13, dtype=np.uint16).reshape(1, 3, 4)
    arr[0, 0, :2] = 0
    path = write_tif(tmp_path / "plain.tif", arr)
    assert read_tile(path).valid.all()
    tile = read_tile(path, nodata=0)
    assert not tile.valid[0, :2].any() and tile.valid.sum() == 10


def test_float32_geotiff_nodata_and_nan(tmp_path: Path) -> None:
    arr = np.linspace(-1.5, 2.5, 2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)
    arr[0, 1, 1] = -9999.0
    arr[1, 3, 2] = np.nan
    tile = read_tile(write_tif(tmp_path / "f32.tif", arr, nodata=-9999.0))
    assert not tile.valid[1, 1] and not tile.valid[3, 2]
    assert tile.valid.sum() == 23
    np.testing.assert_array_equal(tile.data[:, tile.valid], arr[:, tile.valid])


def test_all_nodata_tile_raises(tmp_path: Path) -> None:
    path = write_tif(tmp_path / "empty.tif", np.zeros((3, 4, 4), np.uint16), nodata=0)
    with pytest.raises(InputError, match="all pixels are nodata") as exc:
        read_tile(path)
    assert exc.value.file == str(path)


def test_corrupt_geotiff_raises(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.tif"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(path)
    assert exc.value.file == str(path)
    with pytest.raises(InputError, match="cannot read image"):
        tile_info(path)


def test_truncated_geotiff_raises(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 60000, (2, 300, 300), dtype=np.uint16)
    full = write_tif(tmp_path / "full.tif", arr).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(path)
    assert exc.value.file == str(path)


# --- generated JPEG/PNG and other errors ------------------------------------------------------


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the reader relies on PIL's strict default
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rgb_noise(150, 150)).save(whole, quality=90)
    assert read_tile(whole).data.shape == (3, 150, 150)
    path = tmp_path / "half.jpg"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert tile_info(path).width == 150  # the header alone is intact
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(path)
    assert exc.value.file == str(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.tif", tmp_path / "nope.jpg"):
        with pytest.raises(InputError, match="file not found") as exc:
            read_tile(path)
        assert exc.value.file == str(path)
        with pytest.raises(InputError, match="file not found"):
            tile_info(path)


def test_unsupported_suffix_raises(tmp_path: Path) -> None:
    path = tmp_path / "tile.bmp"
    Image.fromarray(rgb_noise(4, 4)).save(path)
    with pytest.raises(InputError, match="unsupported image type"):
        read_tile(path)


def test_wrong_band_index_raises() -> None:
    jpeg = aid_paths(1)[0]
    for path, bands, bad, count in ((RGBN, [1, 5], 5, 4), (jpeg, [0], 0, 3), (jpeg, [4, 1], 4, 3)):
        with pytest.raises(InputError, match=f"band {bad} .*has {count} bands") as exc:
            read_tile(path, bands=bands)
        assert exc.value.file == str(path)


def test_png_rgba_has_four_bands(tmp_path: Path) -> None:
    rgba = np.concatenate([rgb_noise(10, 12), np.full((10, 12, 1), 77, np.uint8)], axis=2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    info = tile_info(path)
    assert (info.count, info.width, info.height) == (4, 12, 10)
    tile = read_tile(path)
    assert tile.data.shape == (4, 10, 12)
    np.testing.assert_array_equal(tile.data, rgba.transpose(2, 0, 1))


def test_grayscale_jpeg_has_one_band(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.fromarray(rgb_noise(20, 30)[..., 0]).save(path)
    assert tile_info(path).count == 1
    assert read_tile(path).data.shape == (1, 20, 30)


# --- band statistics --------------------------------------------------------------------------


def masked_tile(seed: int = 3) -> Tile:
    """A 3-band tile whose invalid pixels hold a huge value."""
    rng = np.random.default_rng(seed)
    data = rng.normal(100, 20, (3, 40, 40)).astype(np.float32)
    valid = rng.random((40, 40)) > 0.3
    data[:, ~valid] = 1e30
    return Tile(data=data, valid=valid, crs=None, source="masked")


def test_band_stats_match_numpy_on_valid_pixels() -> None:
    tiles = [read_tile(p) for p in aid_paths(3)] + [masked_tile()]
    stats = BandStats.accumulate(iter(tiles))
    pixels = np.concatenate([t.data[:, t.valid].astype(np.float64) for t in tiles], axis=1)
    assert len(stats) == 3
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=1e-10)
    assert max(stats.mean) < 256  # the 1e30 fill never got in


def test_band_stats_numerically_stable_with_large_offset() -> None:
    rng = np.random.default_rng(4)
    tiles = [
        Tile(
            data=(1e6 + rng.integers(0, 4, (1, 30, 30))).astype(np.float32),
            valid=np.ones((30, 30), bool),
            crs=None,
            source=f"t{i}",
        )
        for i in range(20)
    ]
    pixels = np.concatenate([t.data.reshape(1, -1).astype(np.float64) for t in tiles], axis=1)
    stats = BandStats.accumulate(tiles)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=1e-9)


def test_band_stats_roundtrip_floor_and_errors() -> None:
    stats = BandStats.accumulate([masked_tile()])
    again = BandStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    flat = Tile(np.full((2, 4, 4), 7, np.float32), np.ones((4, 4), bool), None, "flat")
    assert BandStats.accumulate([flat]).std == (1e-6, 1e-6)
    with pytest.raises(InputError, match="has 2 bands, earlier tiles have 3") as exc:
        BandStats.accumulate([masked_tile(), flat])
    assert exc.value.file == "flat"
    with pytest.raises(InputError, match="no valid pixels"):
        BandStats.accumulate([])
    with pytest.raises(InputError, match="bad band statistics"):
        BandStats.from_dict({"mean": [1.0]})


# --- model input ------------------------------------------------------------------------------


def test_prepare_tile_normalizes_and_resizes() -> None:
    tile = read_tile(aid_paths(1)[0])
    stats = BandStats.accumulate([tile])
    same = prepare_tile(tile, size=150, stats=stats)
    assert same.shape == (3, 150, 150) and same.dtype.is_floating_point
    np.testing.assert_allclose(same.mean(dim=(1, 2)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(same.std(dim=(1, 2), correction=0).numpy(), 1, atol=1e-4)
    small = prepare_tile(tile, size=64, stats=stats)
    assert small.shape == (3, 64, 64)
    np.testing.assert_allclose(small.mean(dim=(1, 2)).numpy(), 0, atol=0.05)
    assert prepare_tile(tile, size=224, stats=stats).shape == (3, 224, 224)


def test_prepare_tile_zeroes_nodata() -> None:
    tile = masked_tile()
    stats = BandStats.accumulate([tile])
    same = prepare_tile(tile, size=40, stats=stats)
    assert (same[:, ~tile.valid] == 0).all()
    assert (same[:, tile.valid] != 0).all()
    small = prepare_tile(tile, size=16, stats=stats)
    assert small.isfinite().all() and small.abs().max() < 10  # the 1e30 fill never leaks


def test_prepare_tile_antialiases_when_downsampling() -> None:
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 75)[None, None].repeat(150, 1)
    tile = Tile(stripes, np.ones((150, 150), bool), None, "stripes")
    out = prepare_tile(tile, size=50, stats=BandStats(mean=(0.0,), std=(1.0,)))
    assert out.shape == (1, 50, 50)
    assert (out - 0.5).abs().max() < 0.2  # plain bilinear would pick 0s and 1s


def test_prepare_tile_band_mismatch_names_source() -> None:
    stats = BandStats(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="has 4 bands, the model expects 3") as exc:
        prepare_tile(read_tile(RGBN), size=32, stats=stats)
    assert exc.value.file == str(RGBN)


@pytest.mark.parametrize("src", [REAL_JPEG, RGBN], ids=["jpeg", "geotiff"])
@pytest.mark.parametrize("how", ["truncated", "garbage", "header"])
def test_damaged_real_tiles_raise_naming_the_file(src: Path, how: str, tmp_path: Path) -> None:
    path = damage(src, tmp_path / f"{how}{src.suffix}", how)
    if how == "header":
        with pytest.raises(InputError, match="cannot read image") as exc:
            tile_info(path)
        assert exc.value.file == str(path)
    else:
        # Only the header is read up front: the damage shows when the pixels are decoded.
        assert tile_info(path) == tile_info(src)
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(path)
    assert exc.value.file == str(path)
    assert str(path) in str(exc.value)


def test_damage_that_still_decodes_is_not_detectable(tmp_path: Path) -> None:
    # Documented limitation: a JPEG has no checksum, so zeroed bytes inside its image data decode
    # to wrong pixels without an error. A compressed GeoTIFF's blocks do not decompress: error.
    jpeg = damage(REAL_JPEG, tmp_path / "zeroed.jpg", "zeroed")
    tile = read_tile(jpeg)
    original = read_tile(REAL_JPEG)
    assert tile.data.shape == original.data.shape
    assert not np.array_equal(tile.data, original.data)
    tif = damage(RGBN, tmp_path / "zeroed.tif", "zeroed")
    with pytest.raises(InputError, match="cannot read image") as exc:
        read_tile(tif)
    assert exc.value.file == str(tif)
