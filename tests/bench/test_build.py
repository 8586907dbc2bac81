"""The benchmark's models: built on the meta device, they carry the pretrained backbone."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from fusion.bench import build
from fusion.bench.build import TIMM_VIT, BenchSettings, build_model, quick_settings, variants
from fusion.configs import CHECKOUT_CONFIGS, config_files, net_config, variant_names
from fusion.models.vit import ViTEncoder


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


def test_the_bench_measures_the_networks_the_configs_give(tmp_path: Path, monkeypatch) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CHECKOUT_CONFIGS, configs)
    base = (configs / "base.yaml").read_text()
    assert "series_dim: 64" in base
    (configs / "base.yaml").write_text(base.replace("series_dim: 64", "series_dim: 48"))
    monkeypatch.setattr(build, "CHECKOUT_CONFIGS", configs)
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
