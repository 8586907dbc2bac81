"""rgbn_map.png: a headless-Chromium screenshot of rgbn.html with one region's popup open
(``ID``: its row in regions.gpkg, which is its region_id there).

Run from the repository root (Debian's chromium installed) after ``fusion predict`` wrote
``results/predict/rgbn.html``: ``uv run python results/predict/screenshot.py [REGION_ID]``.
"""

import sys
import time
from pathlib import Path

from tests.browser import Chromium

HERE = Path(__file__).parent
MAP = "window[document.querySelector('.folium-map').id]"
CENTRE = """(() => {
  let hit = null;
  MAP.eachLayer(layer => { if (layer.feature && layer.feature.id === ID) hit = layer; });
  const p = MAP.latLngToContainerPoint(hit.getCenter());
  const box = MAP.getContainer().getBoundingClientRect();
  return [p.x + box.left, p.y + box.top];
})()"""

if __name__ == "__main__":
    region = int(sys.argv[1]) if len(sys.argv) > 1 else 151
    with Chromium(width=1400, height=950) as browser:
        browser.open(HERE / "rgbn.html")
        x, y = browser.evaluate(CENTRE.replace("MAP", MAP).replace("ID", str(region)))
        browser.click(x, y)
        browser.wait_for("document.querySelector('.leaflet-popup-content')")
        time.sleep(1.0)  # the popup fades in
        browser.screenshot(HERE / "rgbn_map.png")
        assert browser.events.errors() == [], browser.events.errors()
    print(f"wrote {HERE / 'rgbn_map.png'} (popup of region {region})")
