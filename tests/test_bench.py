"""fusion bench: every variant against the bare timm ViT, the scaling curves and the report.

One quick benchmark (tiny batch and tiles, one timed call, the real pretrained ViT) is run for the
module; the tests check what it measured and wrote.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from fusion.bench import models as bench_models
from fusion.bench.models import (
    COLUMNS,
    TARGET_RATIO,
    TIMM_VIT,
    BenchSettings,
    build_model,
    count_flops,
    lstm_flops,
    median_times,
    quick_settings,
    run_bench,
    spread,
    variants,
)
from fusion.bench.scaling import FUSION_MODULES, QUICK, SERIES_HOURS
from fusion.configs import CHECKOUT_CONFIGS, config_files, net_config, variant_names
from fusion.models.vit import ViTEncoder

FUSIONS = ("concat", "msift", "mbt_early", "mbt_mid", "mbt_late")
PNGS = ("scaling_series.png", "scaling_tile.png", "scaling_bottlenecks.png",
        "scaling_fusion_tokens.png")  # fmt: skip


@dataclass(frozen=True)
class Bench:
    output: Path
    frame: pd.DataFrame


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, vit_weights: Path) -> Bench:
    output = tmp_path_factory.mktemp("bench")
    frame = run_bench(output, BenchSettings(weights=str(vit_weights)), quick=True)
    return Bench(output, frame)


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


def test_scaling_curves(bench: Bench) -> None:
    series = pd.read_csv(bench.output / "scaling_series.csv")
    for encoder in ("bilstm", "trans_blstm"):
        rows = series[series["series_encoder"] == encoder].set_index("hours")
        assert rows.index.tolist() == list(SERIES_HOURS)
        assert (rows["ms_per_batch"] > 0).all()
    bilstm = series[series["series_encoder"] == "bilstm"].set_index("hours")["ms_per_batch"]
    assert bilstm[max(SERIES_HOURS)] > bilstm[min(SERIES_HOURS)]

    tile = pd.read_csv(bench.output / "scaling_tile.csv")
    assert sorted(tile["tile"].unique()) == sorted(QUICK["tile"])
    assert set(tile["model"]) == {TIMM_VIT, "mbt_mid"}
    assert (tile.loc[tile["model"] == TIMM_VIT, "ratio"] == 1.0).all()

    bottlenecks = pd.read_csv(bench.output / "scaling_bottlenecks.csv")
    assert len(bottlenecks) == 2 * len(QUICK["bottlenecks"])

    tokens = pd.read_csv(bench.output / "scaling_fusion_tokens.csv")
    assert set(tokens["module"]) == set(FUSION_MODULES)
    gflops = tokens.pivot(index="tokens", columns="module", values="gflops_per_sample")
    assert (gflops.diff().iloc[1:] > 0).all().all()  # more tokens, more work
    # At equal depth, full cross-attention costs more than exchanging through bottlenecks.
    assert (gflops["msift_depth4"] > gflops["mbt_early"]).all()


def test_built_models_carry_the_pretrained_backbone(vit_weights: Path) -> None:
    settings = quick_settings(BenchSettings(weights=str(vit_weights)))
    reference = ViTEncoder(weights=str(vit_weights), img_size=settings.image_size, token_grid=None)
    images = torch.randn(2, 3, settings.image_size, settings.image_size)
    with torch.inference_mode():
        expected = reference.backbone.forward_features(images)
        floor = build_model(TIMM_VIT, settings).forward_features(images)
        fused = build_model("mbt_mid", settings).image_encoder.backbone.forward_features(images)
    torch.testing.assert_close(floor, expected)
    torch.testing.assert_close(fused, expected)


def test_lstm_flops_are_counted_once() -> None:
    lstm = nn.LSTM(10, 6, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 5, 10)
    per_token = 2 * (2 * 4 * 6 * (10 + 6)) + 2 * (2 * 4 * 6 * (12 + 6))
    assert lstm_flops(lstm, x) == per_token * 3 * 5
    model = nn.Sequential(lstm)
    counted = count_flops(model, lambda: model(x))
    assert per_token * 3 * 5 <= counted < 2 * per_token * 3 * 5


def test_median_times_interleaves_the_calls() -> None:
    order: list[str] = []
    times = median_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
    )
    assert order == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert spread({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 2.0]}) == 1.0


def test_the_bench_measures_the_networks_the_configs_give(tmp_path: Path, monkeypatch) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CHECKOUT_CONFIGS, configs)
    base = (configs / "base.yaml").read_text()
    assert "series_dim: 64" in base
    (configs / "base.yaml").write_text(base.replace("series_dim: 64", "series_dim: 48"))
    monkeypatch.setattr(bench_models, "CHECKOUT_CONFIGS", configs)
    variants.cache_clear()
    try:
        specs = variants()
    finally:
        variants.cache_clear()  # the next caller reads the checkout's configs again
    assert {s["series_dim"] for s in specs.values()} == {48}  # a change to a config shows
    for name in variant_names(configs):  # every row with a config of its own is that config's
        net = asdict(net_config(config_files(name, configs)))
        spec = specs[name.replace("_trans_blstm", "+trans_blstm")]
        assert {k: spec[k] for k in net if k != "vit_weights"} == {
            k: v for k, v in net.items() if k != "vit_weights"
        }, name
    # A fusion without a TRANS-BLSTM config of its own: its BiLSTM config, that encoder swapped.
    swapped = {**specs["concat"], "series_encoder": "trans_blstm", "trans_blstm_variant": 1}
    assert specs["concat+trans_blstm"] == swapped
