"""The interactive HTML map, opened in headless Chromium with the network cut off: it draws every
region of the real ``rgbn.tif`` grid over the raster, loads nothing from the network, logs no
error, and a click opens the region's popup."""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from matplotlib.colors import to_hex
from shapely.geometry import GeometryCollection, LineString

from fusion.errors import InputError
from fusion.maps import class_colors
from fusion.predict import check_output
from fusion.webmap import (
    DECIMALS,
    SKIPPED_HEX,
    build_web_map,
    popup_properties,
    raster_overlay,
    region_features,
    write_web_map,
)
from tests.browser import Chromium

CLASSES = ["school", "park", "housing"]
NOTE = 'edge cell: <b>not bold</b> & "quoted"'
MAP = "window[document.querySelector('.folium-map').id]"
# Page coordinates of the centre of the region whose feature id is FEATURE.
CENTRE = """(() => {
  const map = MAP;
  let hit = null;
  map.eachLayer(layer => { if (layer.feature && layer.feature.id === FEATURE) hit = layer; });
  const p = map.latLngToContainerPoint(hit.getCenter());
  const box = map.getContainer().getBoundingClientRect();
  return [p.x + box.left, p.y + box.top];
})()""".replace("MAP", MAP)
POPUP = "document.querySelector('.leaflet-popup-content')?.innerText"


@pytest.fixture(scope="module")
def rgbn(shared_data: Path) -> Path:
    return shared_data / "geotiff" / "rgbn.tif"


@pytest.fixture()
def predictions(shared_data: Path) -> gpd.GeoDataFrame:
    """The 252 real cells with made-up predictions of every column ``fusion predict`` writes
    (and ``pred_set`` / ``set_size``): cells sticking out of the raster skipped, ten uncertain,
    one without geometry, one a collection of a polygon and a line."""
    frame = gpd.read_file(shared_data / "geotiff" / "regions.gpkg")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(frame))
    frame["pred"] = [CLASSES[i] for i in probs.argmax(1)]
    for k, name in enumerate(CLASSES):
        frame[f"p_{name}"] = probs[:, k]
    for view, shift in (("image", 1), ("series", 2)):
        view_probs = np.roll(probs, shift, axis=1)
        frame[f"pred_{view}"] = [CLASSES[i] for i in view_probs.argmax(1)]
        for k, name in enumerate(CLASSES):
            frame[f"p_{view}_{name}"] = view_probs[:, k]
    frame["pred_set"] = ["|".join(CLASSES[i] for i in np.flatnonzero(p >= 0.25)) for p in probs]
    frame["set_size"] = [int((p >= 0.25).sum()) for p in probs]
    frame["status"] = "image+series"
    frame["note"] = ""
    skipped = ~frame["complete"].to_numpy()
    frame.loc[skipped, ["pred", "pred_image", "pred_series", "pred_set", "status"]] = [
        "", "", "", "", "skipped",
    ]  # fmt: skip
    frame.loc[skipped, "set_size"] = 0
    frame.loc[skipped, [c for c in frame.columns if c.startswith("p_")]] = np.nan
    frame.loc[skipped, "note"] = NOTE
    frame.loc[frame.index[20:30], "status"] = "uncertain"
    frame.loc[frame.index[40], "geometry"] = None
    cell = frame.geometry.iloc[41]
    frame.loc[frame.index[41], "geometry"] = GeometryCollection(
        [cell, LineString(list(cell.exterior.coords)[:2])]
    )
    return frame


def expected_counts(frame: gpd.GeoDataFrame) -> dict[str, int]:
    """Stroke colour -> number of drawn regions (uncertain ones included)."""
    drawn = frame[frame.geometry.notna()]
    colors = [to_hex(c) for c in class_colors(len(CLASSES))]
    counts = {colors[k]: int((drawn["pred"] == name).sum()) for k, name in enumerate(CLASSES)}
    counts[SKIPPED_HEX] = int((drawn["status"] == "skipped").sum())
    return counts


def open_map(browser: Chromium, path: Path) -> None:
    browser.open(path)
    browser.wait_for(f"{MAP} && document.querySelector('img.leaflet-image-layer')?.complete")


def assert_offline(browser: Chromium, path: Path) -> None:
    """No error logged, and nothing requested but the page itself and ``data:`` URIs."""
    assert browser.events.errors() == []
    page = path.resolve().as_uri()
    requests = browser.events.requests
    assert requests[0] == page
    assert [url for url in requests if url != page and not url.startswith("data:")] == []
    assert any(url.startswith("data:image/png") for url in requests)  # the raster overlay
    text = path.read_text()  # no resource is even named by a URL
    assert not re.search(
        r"<script[^>]*\ssrc=|<link|<img[^>]*\ssrc=|url\(\s*[\"']?(https?:)?//", text
    )


def click_region(browser: Chromium, feature_id: int) -> str:
    x, y = browser.evaluate(CENTRE.replace("FEATURE", str(feature_id)))
    browser.click(x, y)
    return browser.wait_for(POPUP) or ""


def check_paths(browser: Chromium, predictions: gpd.GeoDataFrame) -> None:
    """One SVG path per region with a polygon, stroked in its class colour (grey if skipped,
    dashed if uncertain); the legend counts them."""
    paths = "document.querySelectorAll('path.leaflet-interactive')"
    assert browser.evaluate(f"{paths}.length") == int(predictions.geometry.notna().sum()) == 251
    strokes = browser.evaluate(f"Array.from({paths}, p => p.getAttribute('stroke'))")
    assert {color: strokes.count(color) for color in set(strokes)} == expected_counts(predictions)
    dashes = browser.evaluate(f"Array.from({paths}, p => p.getAttribute('stroke-dasharray'))")
    assert sum(d is not None for d in dashes) == 10
    legend = browser.evaluate("document.querySelector('.fusion-legend').innerText")
    drawn = predictions.dropna(subset="geometry")
    for name in CLASSES:
        assert f"{name} ({(drawn['pred'] == name).sum()})" in legend
    assert "skipped (no data) (31)" in legend and "uncertain (10)" in legend


def check_overlay_placement(browser: Chromium, predictions: gpd.GeoDataFrame) -> None:
    """Every cell wholly on the raster is drawn on the raster view, every other one sticks out."""
    image = browser.evaluate(
        "(() => { const r = document.querySelector('img.leaflet-image-layer')"
        ".getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })()"
    )
    boxes = browser.evaluate(
        "(() => { const out = []; MAP.eachLayer(l => { if (l.feature) {"
        " const r = l._path.getBoundingClientRect();"
        " out.push([l.feature.id, r.left, r.top, r.right, r.bottom]); } }); return out; })()"
        .replace("MAP", MAP)
    )  # fmt: skip
    complete = set(np.flatnonzero(predictions["complete"].to_numpy()).tolist())
    inside = [b for b in boxes if b[0] in complete]
    assert len(inside) == 220  # the 221 complete cells less the one without geometry
    for _, left, top, right, bottom in inside:
        assert left >= image[0] - 2 and top >= image[1] - 2
        assert right <= image[2] + 2 and bottom <= image[3] + 2
    outside = [b for b in boxes if b[0] not in complete]
    assert len(outside) == 31 and all(b[3] > image[2] + 2 or b[4] > image[3] + 2 for b in outside)


def check_popups(browser: Chromium, predictions: gpd.GeoDataFrame) -> None:
    """A click on a region opens its popup: every prediction column present, as text."""
    row = predictions.iloc[100]
    text = click_region(browser, 100)
    top = max(CLASSES, key=lambda c: row[f"p_{c}"])
    image_p = row[f"p_image_{row['pred_image']}"]
    for line in (
        f"region_id\t{row['region_id']}",
        f"predicted class\t{row['pred']}",
        f"probabilities\t{top} {row[f'p_{top}']:.2f}\n",
        f"prediction set\t{row['pred_set']}",
        f"set size\t{row['set_size']}",
        f"image alone\t{row['pred_image']} ({image_p:.2f})",
        "series alone\t",
        "status\timage+series",
    ):
        assert line in text
    assert "note" not in text  # empty: no row

    browser.evaluate(f"{MAP}.closePopup() && null")
    assert browser.wait_for(f"!{POPUP}")  # gone once it has faded out
    edge = int(np.flatnonzero(~predictions["complete"].to_numpy())[0])
    text = click_region(browser, edge)
    assert "status\tskipped" in text and f"note\t{NOTE}" in text
    assert "predicted class" not in text and "probabilities" not in text
    assert browser.evaluate("document.querySelector('.leaflet-popup-content b')") is None


def test_svg_map_offline_every_region_drawn_and_popups(
    rgbn: Path, predictions: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    path = write_web_map(rgbn, predictions, CLASSES, tmp_path / "map.html", id_column="region_id")
    with Chromium() as browser:
        open_map(browser, path)
        assert_offline(browser, path)
        assert browser.evaluate("L.version") == "1.9.4"
        assert browser.evaluate("document.querySelectorAll('.leaflet-container').length") == 1
        check_paths(browser, predictions)
        check_overlay_placement(browser, predictions)
        check_popups(browser, predictions)
        assert browser.events.errors() == []


def test_canvas_map_for_many_regions(
    rgbn: Path, predictions: gpd.GeoDataFrame, tmp_path: Path
) -> None:
    """Above ``canvas_above`` regions they are drawn on one canvas; popups still open."""
    fmap = build_web_map(rgbn, predictions, CLASSES, id_column="region_id", canvas_above=100)
    path = tmp_path / "canvas.html"
    path.write_text(fmap.get_root().render())
    with Chromium() as browser:
        open_map(browser, path)
        assert_offline(browser, path)
        assert browser.evaluate("document.querySelectorAll('path.leaflet-interactive').length") == 0
        assert (
            browser.evaluate("document.querySelectorAll('.leaflet-overlay-pane canvas').length")
            == 1
        )
        layers = (
            f"(() => {{ let n = 0; {MAP}.eachLayer(l => {{ if (l.feature) n++; }}); return n; }})()"
        )
        assert browser.evaluate(layers) == 251
        text = click_region(browser, 100)
        assert f"predicted class\t{predictions['pred'].iloc[100]}" in text
        assert browser.events.errors() == []


def test_popup_rows_come_from_the_columns_present(predictions: gpd.GeoDataFrame) -> None:
    frame = predictions[["region_id", "pred", *[f"p_{c}" for c in CLASSES], "geometry"]]
    table, fields = popup_properties(frame, CLASSES, id_column="region_id")
    assert fields == [("id", "region_id"), ("pred", "predicted class"), ("top", "probabilities")]
    row = frame.iloc[0]
    order = sorted(CLASSES, key=lambda c: -row[f"p_{c}"])
    assert table["top"].iloc[0] == "\n".join(f"{c} {row[f'p_{c}']:.2f}" for c in order)
    skipped = int(np.flatnonzero(~predictions["complete"].to_numpy())[0])
    assert table["top"].iloc[skipped] is None and table["pred"].iloc[skipped] is None

    table, fields = popup_properties(predictions, CLASSES, top_k=2)
    assert [key for key, _ in fields] == [
        "pred", "top", "pred_set", "set_size", "image", "series", "status", "note",
    ]  # fmt: skip
    assert table["top"].str.count("\n").max() == 1
    assert table["note"].iloc[skipped] == NOTE and table["note"].iloc[0] is None
    first = predictions.iloc[0]
    image_p = first[f"p_image_{first['pred_image']}"]
    assert table["image"].iloc[0] == f"{first['pred_image']} ({image_p:.2f})"

    table, fields = popup_properties(predictions[["pred", "pred_series"]], CLASSES)
    assert [key for key, _ in fields] == ["pred", "series"]  # no probabilities: the name alone
    assert table["series"].tolist() == [v or None for v in predictions["pred_series"]]


def test_features_are_lonlat_rounded_and_only_polygons(predictions: gpd.GeoDataFrame) -> None:
    table, _ = popup_properties(predictions, CLASSES, id_column="region_id")
    features, drawn = region_features(predictions, table)
    assert len(features) == len(drawn) == 251 and 40 not in drawn
    text = json.dumps([f["geometry"] for f in features])
    decimals = [len(d) for d in re.findall(r"\.(\d+)", text)]
    assert max(decimals) <= DECIMALS
    lon, lat = features[0]["geometry"]["coordinates"][0][0]
    assert -72.23 < lon < -72.20 and 18.50 < lat < 18.53  # rgbn.tif is near Port-au-Prince
    collection = next(f for f in features if f["id"] == 41)
    assert collection["geometry"]["type"] == "MultiPolygon"  # its line is dropped
    assert "note" not in features[0]["properties"]  # missing values are left out


def test_raster_view_is_downsampled_and_transparent_outside(rgbn: Path) -> None:
    image, [[south, west], [north, east]] = raster_overlay(
        rgbn, rgb_bands=[3, 2, 1], max_pixels=100
    )
    assert image.dtype == np.uint8 and image.shape[2] == 4 and max(image.shape[:2]) == 100
    alpha = image[..., 3]
    assert alpha[image.shape[0] // 2, image.shape[1] // 2] == 255
    assert (alpha == 0).any()  # the UTM raster is slightly turned in Web Mercator
    assert west == pytest.approx(-72.2252, abs=1e-3) and east == pytest.approx(-72.2006, abs=1e-3)
    assert south == pytest.approx(18.5051, abs=1e-3) and north == pytest.approx(18.5237, abs=1e-3)


def test_failures_leave_no_page(rgbn: Path, predictions: gpd.GeoDataFrame, tmp_path: Path) -> None:
    out = tmp_path / "map.html"
    out.write_text("an earlier map")
    bad = predictions.assign(pred=["nowhere"] * len(predictions))
    with pytest.raises(InputError, match="not classes"):
        write_web_map(rgbn, bad, CLASSES, out)
    assert out.read_text() == "an earlier map"
    assert [p.name for p in tmp_path.iterdir()] == ["map.html"]

    (tmp_path / "preds.html").mkdir()
    with pytest.raises(InputError, match="is a folder") as info:
        check_output(tmp_path / "preds.gpkg", regions=True)  # refused before any work
    assert info.value.file == str(tmp_path / "preds.html")
