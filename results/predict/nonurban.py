"""Shares of the non-urban cells of rgbn.tif flagged or given large sets, from rgbn.gpkg.

The cells (``nonurban.csv``: the dry river bed and the fields in the north-east) were picked by
eye on a 3-2-1 composite with the region grid drawn over it. Run from the repository root after
``fusion predict ... --coverage 0.9 --output results/predict/rgbn.gpkg``; writes
``results/predict/nonurban.md``.
"""

from pathlib import Path

import geopandas as gpd
import pandas as pd

HERE = Path(__file__).parent

if __name__ == "__main__":
    preds = gpd.read_file(HERE / "rgbn.gpkg", layer="predictions")
    kinds = pd.read_csv(HERE / "nonurban.csv").set_index("region_id")["kind"]
    preds = preds[preds["status"] != "skipped"].copy()
    preds["kind"] = preds["region_id"].map(kinds).fillna("other cells")
    lines = [
        "| cells | n | uncertain | set of 3+ classes | either | mean set size | labels |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, part in preds.groupby("kind", sort=False):
        uncertain = part["status"].eq("uncertain")
        large = part["set_size"].ge(3)
        labels = ", ".join(f"{k} {v}" for k, v in part["pred"].value_counts().items())
        lines.append(
            f"| {kind} | {len(part)} | {uncertain.mean():.0%} | {large.mean():.0%} | "
            f"{(uncertain | large).mean():.0%} | {part['set_size'].mean():.2f} | {labels} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "nonurban.md").write_text(text)
    print(text)
