"""fusion bench: every variant against the bare timm ViT, and the report.

The tests check what the quick benchmark of ``tests/bench/conftest.py`` measured and wrote.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from fusion.bench.build import TARGET_RATIO, TIMM_VIT, variants
from fusion.bench.models import COLUMNS
from tests.bench.conftest import Bench

FUSIONS = ("concat", "msift", "mbt_early", "mbt_mid", "mbt_late")
PNGS = ("scaling_series.png", "scaling_tile.png", "scaling_bottlenecks.png",
        "scaling_fusion_tokens.png")  # fmt: skip


def _row(frame: pd.DataFrame, variant: str) -> pd.Series:
    return frame.set_index("variant").loc[variant]


def test_every_variant_is_measured(bench: Bench) -> None:
    frame = bench.frame
    expected = [TIMM_VIT, "vit", "bilstm"]
    expected += [f"{f}{suffix}" for f in FUSIONS for suffix in ("", "+trans_blstm")]
    assert frame["variant"].tolist() == [TIMM_VIT, *variants()]
    assert sorted(expected) == sorted(frame["variant"])
    assert list(frame.columns) == list(COLUMNS)
    for column in ("infer_sps", "train_sps", "peak_mib", "params_m", "gflops_per_sample"):
        values = frame[column].astype(float)
        assert values.map(math.isfinite).all() and (values > 0).all(), column
    fusion = frame[frame["fusion"] != "none"]
    assert set(fusion["series_encoder"]) == {"bilstm", "trans_blstm"}
    assert _row(frame, "mbt_mid+trans_blstm")["series_encoder"] == "trans_blstm"
    assert _row(frame, "vit")["series_encoder"] == "none"


def test_ratios_are_to_the_bare_timm_vit(bench: Bench) -> None:
    frame = bench.frame
    floor = _row(frame, TIMM_VIT)
    assert floor["infer_ratio"] == 1.0 and floor["train_ratio"] == 1.0
    assert frame["infer_ratio"].tolist() == pytest.approx(
        (frame["infer_sps"] / floor["infer_sps"]).tolist()
    )
    is_fusion = frame["fusion"] != "none"
    assert frame.loc[~is_fusion, "meets_target"].isna().all()
    assert (
        frame.loc[is_fusion, "meets_target"].tolist()
        == (frame.loc[is_fusion, "infer_ratio"] >= TARGET_RATIO).tolist()
    )


def test_fusion_adds_work_to_the_vit(bench: Bench) -> None:
    frame = bench.frame
    floor = _row(frame, TIMM_VIT)
    fusion = frame[frame["fusion"] != "none"]
    assert (fusion["gflops_per_sample"] >= floor["gflops_per_sample"]).all()
    assert _row(frame, "bilstm")["gflops_per_sample"] > 0  # LSTM products are counted
    mid, mid_tb = _row(frame, "mbt_mid"), _row(frame, "mbt_mid+trans_blstm")
    assert mid_tb["params_m"] > mid["params_m"]
    assert mid_tb["gflops_per_sample"] > mid["gflops_per_sample"]
    # Frozen backbones: the floor trains its 8-class head only, the others their new layers.
    assert floor["trainable_m"] * 1e6 == pytest.approx(384 * 8 + 8)
    assert (fusion["trainable_m"] < 0.2 * fusion["params_m"]).all()
    bare = _row(frame, "bilstm")
    assert bare["trainable_m"] == bare["params_m"]


def test_report_is_written_and_round_trips(bench: Bench) -> None:
    for name in PNGS:
        assert (bench.output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    read = pd.read_csv(bench.output / "results.csv")
    pd.testing.assert_frame_equal(
        read.drop(columns="meets_target"), bench.frame.drop(columns="meets_target")
    )
    pd.testing.assert_series_equal(
        read["meets_target"].astype("boolean"), bench.frame["meets_target"]
    )
    summary = (bench.output / "summary.md").read_text()
    assert f"Fusion variants meeting the {TARGET_RATIO}x inference target" in summary
    for variant in bench.frame["variant"]:
        assert f"| {variant} |" in summary
    assert "scaling_fusion_tokens.png" in summary
