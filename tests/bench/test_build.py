"""The benchmark's models: built on the meta device, they carry the pretrained backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from fusion.bench.build import TIMM_VIT, BenchSettings, build_model, quick_settings
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
