"""The shared figure helpers: the display stretch of a raw tile and the atomic PNG save."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from fusion.data.tiles import read_tile
from fusion.plots import display_rgb, save_figure
from tests.conftest import DATA


def test_display_rgb_stretches_each_band_over_its_valid_pixels() -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1000, size=(4, 20, 30)).astype(np.float32)
    data[1] *= 10  # each band is stretched on its own
    valid = np.ones((20, 30), dtype=bool)
    valid[:, :5] = False
    data[:, ~valid] = 1e6  # invalid pixels do not move the percentiles
    rgb = display_rgb(data, valid)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0
    for b in range(3):
        shown = rgb[..., b][valid]
        # 2-98 percentile stretch: about 2 % of the valid pixels clip at each end.
        assert np.mean(shown == 0.0) == pytest.approx(0.02, abs=0.01)
        assert np.mean(shown == 1.0) == pytest.approx(0.02, abs=0.01)
        lo, hi = np.percentile(data[b][valid], [2, 98])
        np.testing.assert_allclose(shown, np.clip((data[b][valid] - lo) / (hi - lo), 0, 1))


def test_display_rgb_of_one_band_is_grey_and_of_no_valid_pixel_uses_all() -> None:
    band = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    rgb = display_rgb(band, np.zeros((10, 10), dtype=bool))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb[0, 0, 0] == 0.0 and rgb[-1, -1, 0] == 1.0


def test_display_rgb_of_a_real_tile() -> None:
    tile = read_tile(DATA / "aid" / "Center" / "center_10.jpg")
    rgb = display_rgb(tile.data, tile.valid)
    assert rgb.shape == (*tile.data.shape[1:], 3)
    assert 0.0 <= rgb.min() < 0.05 and 0.95 < rgb.max() <= 1.0


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "out" / "line.png")
    assert path == tmp_path / "out" / "line.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["line.png"]  # no temporary file left


def test_a_failed_save_leaves_no_file_and_closes_the_figure(tmp_path: Path) -> None:
    fig, _ = plt.subplots()
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "bad.png", dpi=-1)
    assert not plt.fignum_exists(fig.number)
    assert list(tmp_path.iterdir()) == []
