"""An interactive map of predicted regions (Leaflet through folium) that works offline.

:func:`write_web_map` writes one self-contained HTML file: Leaflet's script and stylesheet are
inlined from an installed package (``django-js-lib-leaflet``, Leaflet's own ``dist`` files), the
raster is a downsampled RGB view embedded as a PNG ``data:`` URI, and the regions are GeoJSON
coloured by predicted class with the colours of the PNG map (:func:`fusion.maps.class_colors`).
Nothing is loaded from the network: folium's default CDN links are dropped and no tile layer is
added. Clicking a region opens a popup built from the prediction columns present.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import folium
import geopandas
import numpy as np
import pandas as pd
import shapely
from branca.element import Element, MacroElement
from folium.template import Template
from folium.utilities import JsCode
from matplotlib.colors import to_hex
from PIL import Image
from rasterio.transform import Affine, array_bounds
from rasterio.warp import Resampling, calculate_default_transform, reproject, transform_bounds

from fusion.data.tiles import band_indexes, open_raster
from fusion.errors import InputError
from fusion.io import atomic_path
from fusion.maps import FILL_ALPHA, SKIPPED_LABEL, class_codes, class_colors, read_overview
from fusion.plots import display_rgb

WEB_MERCATOR = "EPSG:3857"
LONLAT = "EPSG:4326"
SKIPPED_HEX = "#737373"  # the PNG map's grey ("0.45")
UNCERTAIN = "uncertain"
DECIMALS = 6  # coordinates in degrees: 6 decimals is about 0.1 m
TOP_K = 3  # probabilities shown in a popup
CANVAS_ABOVE = 5000  # more regions than this are drawn on a canvas rather than as SVG paths

# Popup rows: property key and label, in order. The region id comes first under its own name.
POPUP_FIELDS = [
    ("pred", "predicted class"),
    ("top", "probabilities"),
    ("pred_set", "prediction set"),
    ("set_size", "set size"),
    ("image", "image alone"),
    ("series", "series alone"),
    ("status", "status"),
    ("note", "note"),
]

_POPUP_JS = """
function fusionPopup(props) {
  const table = document.createElement("table");
  table.className = "fusion-popup";
  for (const [key, label] of FUSION_FIELDS) {
    const value = props[key];
    if (value === undefined || value === null || value === "") continue;
    const row = table.insertRow();
    const head = document.createElement("th");
    head.textContent = label;
    row.appendChild(head);
    const cell = row.insertCell();
    cell.textContent = String(value);
    if (cell.textContent.length > 40) cell.className = "long";
  }
  return table;
}
"""

_STYLE = """
.fusion-popup th { text-align: left; padding-right: 8px; vertical-align: top; white-space: nowrap; }
.fusion-popup td { white-space: pre; }
.fusion-popup td.long { white-space: pre-wrap; min-width: 16em; }
.fusion-legend { background: rgba(255, 255, 255, 0.92); padding: 6px 9px; line-height: 1.5;
  border-radius: 4px; box-shadow: 0 1px 4px rgba(0, 0, 0, 0.4); font: 12px sans-serif; }
.fusion-legend .swatch { display: inline-block; width: 14px; height: 11px; margin-right: 6px;
  vertical-align: middle; box-sizing: border-box; }
.fusion-legend .title { font-weight: bold; }
"""


class _Raw(Element):
    """Text put into the page as it is (not read as a Jinja template, unlike ``Element``)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def render(self, **kwargs: Any) -> str:
        return self.text


class _Legend(MacroElement):
    """A Leaflet control in the bottom-right corner holding ``html``."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            const legend = L.control({position: "bottomright"});
            legend.onAdd = function () {
                const div = L.DomUtil.create("div", "fusion-legend");
                div.innerHTML = {{ this.html|tojson }};
                L.DomEvent.disableClickPropagation(div);
                return div;
            };
            legend.addTo({{ this._parent.get_name() }});
        })();
        {% endmacro %}
        """
    )

    def __init__(self, html: str) -> None:
        super().__init__()
        self._name = "Legend"
        self.html = html


class _OfflineMap(folium.Map):
    """A folium map that links no script or stylesheet from a CDN (Leaflet is inlined)."""

    default_js: list[tuple[str, str]] = []  # noqa: RUF012 (folium's class attribute)
    default_css: list[tuple[str, str]] = []  # noqa: RUF012


@functools.cache
def leaflet_assets() -> tuple[str, str]:
    """Leaflet's minified script and its stylesheet, from the installed ``js_lib_leaflet``.

    The stylesheet's images (the layer-control icon, the default marker) become ``data:`` URIs
    and the script's source-map comment is dropped, so the page refers to no other file.
    """
    folder = resources.files("js_lib_leaflet") / "static" / "js_lib_leaflet"
    script = (folder / "leaflet.js").read_text(encoding="utf-8")
    script = re.sub(r"//# sourceMappingURL=\S+\s*$", "", script)
    css = (folder / "leaflet.css").read_text(encoding="utf-8")

    def inline(match: re.Match[str]) -> str:
        data = (folder / "images" / match.group(1)).read_bytes()
        return f"url(data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    css = re.sub(r"url\(images/([\w.-]+\.png)\)", inline, css)
    for name, text in (("leaflet.js", script), ("leaflet.css", css)):
        if re.search(r"</(script|style)", text, flags=re.IGNORECASE):
            raise RuntimeError(f"{name} cannot be inlined: it closes its own HTML element")
    return script, css


def raster_overlay(
    raster: str | os.PathLike[str],
    *,
    rgb_bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = 1500,
) -> tuple[np.ndarray, list[list[float]]]:
    """A downsampled RGBA view of ``raster`` in Web Mercator, and its ``[[S, W], [N, E]]``.

    Bands are stretched as in the PNG map (:func:`fusion.plots.display_rgb`); nodata and the
    warp's margins are transparent. The longer side is at most ``max_pixels``.
    """
    with open_raster(raster) as src:
        if rgb_bands is None:
            rgb_bands = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        indexes = band_indexes(rgb_bands, src.count, file=raster)
        data, valid = read_overview(src, indexes, nodata=nodata, max_pixels=max_pixels)
        crs, transform, size = src.crs, src.transform, (src.height, src.width)
    if crs is None:
        raise InputError("the raster has no CRS, so it cannot be placed on a map", file=raster)
    h, w = valid.shape
    transform = transform @ Affine.scale(size[1] / w, size[0] / h)
    rgba = np.dstack([display_rgb(data, valid), valid.astype(np.float32)])
    rgba = np.round(rgba * 255).astype(np.uint8).transpose(2, 0, 1)

    dst_transform, dw, dh = calculate_default_transform(
        crs, WEB_MERCATOR, w, h, *array_bounds(h, w, transform)
    )
    scale = max(dw, dh) / max_pixels
    if scale > 1:
        dw, dh = max(1, round(dw / scale)), max(1, round(dh / scale))
        dst_transform, dw, dh = calculate_default_transform(
            crs, WEB_MERCATOR, w, h, *array_bounds(h, w, transform), dst_width=dw, dst_height=dh
        )
    warped = np.zeros((4, dh, dw), dtype=np.uint8)
    reproject(
        rgba,
        warped,
        src_transform=transform,
        src_crs=crs,
        dst_transform=dst_transform,
        dst_crs=WEB_MERCATOR,
        resampling=Resampling.nearest,
    )
    west, south, east, north = transform_bounds(
        WEB_MERCATOR, LONLAT, *array_bounds(dh, dw, dst_transform)
    )
    return warped.transpose(1, 2, 0), [[south, west], [north, east]]


def png_data_uri(rgba: np.ndarray, colors: int = 256) -> str:
    """``(H, W, 4)`` uint8 as a PNG ``data:`` URI, reduced to a palette of ``colors`` (a
    quarter of the size of full RGBA for aerial images; transparency is kept)."""
    image = Image.fromarray(rgba, "RGBA")
    if colors:
        image = image.quantize(colors, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _text(values: pd.Series) -> pd.Series:
    """Values as strings, ``None`` where missing or empty."""
    text = [None if pd.isna(v) else str(v).strip() or None for v in values.astype(object)]
    return pd.Series(text, index=values.index, dtype=object)


def _top(frame: pd.DataFrame, classes: Sequence[str], prefix: str, k: int) -> pd.Series | None:
    """Lines ``name 0.81``: the ``k`` largest ``<prefix><class>`` columns of each row."""
    columns = [f"{prefix}{name}" for name in classes]
    if not all(c in frame.columns for c in columns):
        return None
    probs = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1)[:, :k]
    rows = []
    for p, idx in zip(probs, order, strict=True):
        parts = [f"{classes[i]} {p[i]:.2f}" for i in idx if np.isfinite(p[i])]
        rows.append("\n".join(parts) or None)
    return pd.Series(rows, index=frame.index, dtype=object)


def _view(frame: pd.DataFrame, classes: Sequence[str], view: str) -> pd.Series | None:
    """What one view says alone: ``"name (0.72)"`` from ``pred_<view>`` and ``p_<view>_<name>``
    (the name alone without those columns)."""
    if f"pred_{view}" not in frame.columns:
        return None
    preds = _text(frame[f"pred_{view}"])
    columns = [f"p_{view}_{name}" for name in classes]
    if not all(c in frame.columns for c in columns):
        return preds
    probs = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    index = {name: k for k, name in enumerate(classes)}
    rows = []
    for pred, p in zip(preds, probs, strict=True):
        k = index.get(pred) if pred is not None else None
        rows.append(pred if k is None or not np.isfinite(p[k]) else f"{pred} ({p[k]:.2f})")
    return pd.Series(rows, index=frame.index, dtype=object)


def popup_properties(
    frame: pd.DataFrame,
    classes: Sequence[str],
    *,
    id_column: str | None = None,
    label_column: str = "pred",
    top_k: int = TOP_K,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Each region's popup values (strings, ``None`` where missing) and the ``(key, label)``
    rows they fill, from the columns present: the id, the predicted class, the ``top_k`` largest
    ``p_<class>``, ``pred_set`` / ``set_size``, each view's prediction with its probability
    (``pred_image`` / ``p_image_<class>``, ``pred_series`` / ``p_series_<class>``), ``status``
    and ``note``."""
    columns: dict[str, pd.Series | None] = {
        "pred": _text(frame[label_column]) if label_column in frame.columns else None,
        "top": _top(frame, classes, "p_", top_k),
        "pred_set": _text(frame["pred_set"]) if "pred_set" in frame.columns else None,
        "set_size": _text(frame["set_size"]) if "set_size" in frame.columns else None,
        "image": _view(frame, classes, "image"),
        "series": _view(frame, classes, "series"),
        "status": _text(frame["status"]) if "status" in frame.columns else None,
        "note": _text(frame["note"]) if "note" in frame.columns else None,
    }
    fields = [(key, label) for key, label in POPUP_FIELDS if columns[key] is not None]
    if id_column is not None and id_column in frame.columns:
        columns = {"id": _text(frame[id_column]), **columns}
        fields = [("id", id_column), *fields]
    table = pd.DataFrame({key: columns[key] for key, _ in fields}, index=frame.index)
    return table.astype(object), fields


def _polygonal(geoms: np.ndarray) -> np.ndarray:
    """Each geometry's polygons (a collection keeps its polygonal parts); ``None`` if none."""
    out = np.full(len(geoms), None, dtype=object)
    kind = shapely.get_type_id(geoms)
    plain = (kind == 3) | (kind == 6)
    out[plain] = geoms[plain]
    for i in np.flatnonzero(kind == 7):
        parts = shapely.get_parts(shapely.get_parts(geoms[i]))  # multi-parts split too
        polygons = [p for p in parts if shapely.get_type_id(p) == 3]
        out[i] = shapely.MultiPolygon(polygons) if polygons else None
    out[shapely.is_missing(out) | shapely.is_empty(out)] = None
    return out


def region_features(
    regions: geopandas.GeoDataFrame, properties: pd.DataFrame
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """GeoJSON features of the polygonal regions in lon/lat (coordinates rounded to
    ``DECIMALS``), each with its non-missing ``properties`` and ``id`` = its row position; and
    the positions drawn."""
    shapes = regions.geometry
    if shapes.crs is not None and len(shapes):
        shapes = shapes.to_crs(LONLAT)
    geoms = _polygonal(np.asarray(shapes.values, dtype=object))
    drawn = np.flatnonzero(~shapely.is_missing(geoms))
    rounded = shapely.transform(geoms[drawn], lambda xy: np.round(xy, DECIMALS))
    records = properties.iloc[drawn].to_dict("records")
    features = [
        {
            "type": "Feature",
            "id": int(i),
            "geometry": shapely.geometry.mapping(geom),
            "properties": {k: v for k, v in record.items() if v is not None},
        }
        for i, geom, record in zip(drawn, rounded, records, strict=True)
    ]
    return features, drawn


def region_style(color: str, *, uncertain: bool = False, skipped: bool = False) -> dict[str, Any]:
    """Leaflet path options: filled with ``color``; an uncertain region has a thick dashed
    outline and a lighter fill, a skipped one a grey outline and almost no fill."""
    if skipped:
        return {
            "color": SKIPPED_HEX,
            "weight": 1.5,
            "opacity": 1.0,
            "fillColor": SKIPPED_HEX,
            "fillOpacity": 0.08,
        }
    if uncertain:
        return {
            "color": color,
            "weight": 3,
            "opacity": 1.0,
            "dashArray": "6 4",
            "fillColor": color,
            "fillOpacity": FILL_ALPHA / 3,
        }
    return {
        "color": color,
        "weight": 1,
        "opacity": 0.9,
        "fillColor": color,
        "fillOpacity": FILL_ALPHA,
    }


def legend_html(entries: Sequence[tuple[str, dict[str, Any]]], title: str) -> str:
    """A legend: a swatch drawn in each entry's style, then its (HTML-escaped) label."""
    rows = [f'<div class="title">{html.escape(title)}</div>']
    for label, style in entries:
        border = f"{min(style['weight'], 2)}px {'dashed' if 'dashArray' in style else 'solid'}"
        fill = f"{style['fillColor']}{round(style['fillOpacity'] * 255):02x}"
        swatch = (
            f'<span class="swatch" style="border: {border} {style["color"]}; '
            f'background: {fill}"></span>'
        )
        rows.append(f"<div>{swatch}{html.escape(label)}</div>")
    return "".join(rows)


def _script(text: str) -> str:
    """``text`` (JSON or script) safe inside a ``<script>`` element."""
    return text.replace("</", "<\\/")


def drawn_classes(
    regions: geopandas.GeoDataFrame, classes: Sequence[str], label_column: str, drawn: np.ndarray
) -> np.ndarray:
    """Class index of each drawn region, ``-1`` where skipped (no label, or status
    ``skipped``)."""
    codes = class_codes(regions, classes, label_column)[drawn]
    if "status" in regions.columns:
        codes[(_text(regions["status"]).iloc[drawn] == "skipped").to_numpy()] = -1
    return codes


def _embed_assets(fmap: folium.Map, fields: list[tuple[str, str]], title: str) -> None:
    """Leaflet, the page's styles and the popup builder, inline in the page's header."""
    page = fmap.get_root()
    page.title = title
    script, css = leaflet_assets()
    page.header.add_child(_Raw(f"<style>{css}{_STYLE}</style>"), name="leaflet_css")
    page.header.add_child(_Raw(f"<script>{script}</script>"), name="leaflet")
    popup = f"const FUSION_FIELDS = {_script(json.dumps(fields))};{_POPUP_JS}"
    page.header.add_child(_Raw(f"<script>{popup}</script>"), name="fusion_popup")


def _add_layer(
    fmap: folium.Map, features: list[dict[str, Any]], color: str, name: str, *, skipped: bool
) -> None:
    """One toggleable GeoJSON layer; a feature with status ``uncertain`` gets its own style."""
    normal = region_style(color, skipped=skipped)
    doubtful = region_style(color, uncertain=True, skipped=skipped)
    folium.GeoJson(
        {"type": "FeatureCollection", "features": features},
        name=name,
        style_function=lambda f: doubtful if f["properties"].get("status") == UNCERTAIN else normal,
        on_each_feature=JsCode(
            "function (feature, layer) {"
            " layer.bindPopup(() => fusionPopup(feature.properties),"
            " {minWidth: 220, maxWidth: 420}); }"
        ),
    ).add_to(fmap)


def _add_layers(
    fmap: folium.Map, features: list[dict[str, Any]], codes: np.ndarray, classes: Sequence[str]
) -> list[tuple[str, dict[str, Any]]]:
    """A layer per class present (then the skipped regions); the legend entries."""
    colors = [to_hex(c, keep_alpha=False) for c in class_colors(len(classes))]
    groups = [*enumerate(zip(classes, colors, strict=True)), (-1, (SKIPPED_LABEL, SKIPPED_HEX))]
    entries = []
    for k, (name, color) in groups:
        members = np.flatnonzero(codes == k)
        if len(members):
            label = f"{name} ({len(members)})"
            _add_layer(fmap, [features[i] for i in members], color, label, skipped=k < 0)
            entries.append((label, region_style(color, skipped=k < 0)))
    uncertain = sum(f["properties"].get("status") == UNCERTAIN for f in features)
    if uncertain:
        entries.append((f"{UNCERTAIN} ({uncertain})", region_style("#333333", uncertain=True)))
    return entries


def build_web_map(
    raster: str | os.PathLike[str],
    regions: geopandas.GeoDataFrame,
    classes: Sequence[str],
    *,
    id_column: str | None = None,
    label_column: str = "pred",
    rgb_bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = 1500,
    title: str = "",
    canvas_above: int = CANVAS_ABOVE,
) -> folium.Map:
    """The map :func:`write_web_map` saves (see there)."""
    image, bounds = raster_overlay(
        raster, rgb_bands=rgb_bands, nodata=nodata, max_pixels=max_pixels
    )
    properties, fields = popup_properties(
        regions, classes, id_column=id_column, label_column=label_column
    )
    features, drawn = region_features(regions, properties)
    codes = drawn_classes(regions, classes, label_column, drawn)

    prefer_canvas = len(features) > canvas_above
    fmap = _OfflineMap(tiles=None, control_scale=True, prefer_canvas=prefer_canvas, zoom_snap=0.25)
    _embed_assets(fmap, fields, title or f"Predicted classes over {Path(raster).name}")
    name = f"raster: {Path(raster).name}"
    folium.raster_layers.ImageOverlay(png_data_uri(image), bounds, name=name).add_to(fmap)
    entries = _add_layers(fmap, features, codes, classes)
    _Legend(legend_html(entries, label_column)).add_to(fmap)
    folium.LayerControl(collapsed=True).add_to(fmap)
    fmap.fit_bounds(bounds)
    return fmap


def write_web_map(
    raster: str | os.PathLike[str],
    regions: geopandas.GeoDataFrame,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    **options: Any,
) -> Path:
    """Write an offline HTML map of ``regions`` coloured by predicted class over ``raster``.

    ``regions`` holds a geometry and a ``label_column`` (default ``pred``: class names or
    indexes, empty where skipped) and may hold the other prediction columns, shown in each
    region's popup (:func:`popup_properties`). A region whose ``status`` is ``skipped`` (or with
    no label) is grey, one whose ``status`` is ``uncertain`` has a thick dashed outline.
    Regions with no polygon are not drawn. Leaflet, the raster view (downsampled to at most
    ``max_pixels``) and the regions are all inside the file, so it opens without a network.
    The file is written atomically. ``options``: those of :func:`build_web_map`.
    """
    fmap = build_web_map(raster, regions, classes, **options)
    page = fmap.get_root().render()
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
