"""The fusion classifier's heads: per-view experts beside the fusion module, pooled with weights."""

from __future__ import annotations

import pytest
import torch

from fusion.models.classifier import FusionClassifier
from fusion.models.experts import pool_experts

B, K, T = 4, 5, 48


def make(**kwargs) -> FusionClassifier:
    torch.manual_seed(0)
    net = FusionClassifier(
        num_classes=K, vit_weights=None, img_size=28, token_grid=2, series_dim=16,
        fusion_dim=16, fusion_heads=2, fusion_depth=2, **kwargs,
    )  # fmt: skip
    return net.eval()


def inputs(has_image: bool = True, has_series: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "image_tokens": torch.randn(B, 5, 384),
        "series": torch.randn(B, T, 5),
        "series_mask": torch.ones(B, T, dtype=torch.bool),
        "has_image": torch.full((B,), has_image),
        "has_series": torch.full((B,), has_series),
    }


@pytest.mark.parametrize("fusion", ["concat", "msift", "mbt"])
def test_experts_sit_beside_the_fusion_and_the_output_pools_them(fusion: str) -> None:
    net = make(fusion=fusion, experts=True)
    assert net.head_names == ("fused", "image", "series")
    net.view_weights.copy_(torch.tensor([0.5, 1.5, 0.25]))
    with torch.no_grad():
        heads = net.heads(**inputs())
        out = net(**inputs())
    expected = 0.5 * heads["fused"] + 1.5 * heads["image"] + 0.25 * heads["series"]
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(pool_experts(heads, net.view_weights), out)


def test_an_expert_without_its_view_adds_nothing() -> None:
    net = make(fusion="mbt", experts=True)
    with torch.no_grad():
        no_series = net.heads(**inputs(has_series=False))
        no_image = net.heads(**inputs(has_image=False))
        both = net.heads(**inputs())
    assert (no_series["series"] == 0).all() and (no_image["image"] == 0).all()
    assert torch.allclose(no_series["image"], both["image"])  # an expert reads its view alone
    assert not torch.allclose(no_series["fused"], both["fused"])  # the missing token stands in


def test_the_image_expert_reads_the_cls_and_the_mean_patch_token() -> None:
    net = make(fusion="mbt", experts=True)
    x = inputs()
    linear = net.image_expert.net[-1]
    assert linear.in_features == 2 * 384
    shuffled = {**x, "image_tokens": x["image_tokens"][:, [0, 4, 3, 2, 1]]}  # patches reordered
    with torch.no_grad():
        assert torch.allclose(net.heads(**x)["image"], net.heads(**shuffled)["image"], atol=1e-6)
        changed = {**x, "image_tokens": x["image_tokens"].clone()}
        changed["image_tokens"][:, 2] += 1.0
        assert not torch.allclose(net.heads(**x)["image"], net.heads(**changed)["image"])


def test_single_view_models_have_one_head() -> None:
    assert make(series=False, fusion="none").head_names == ("image",)
    assert make(image=False, fusion="none").head_names == ("series",)
    assert make(fusion="mbt").head_names == ("fused",)  # no experts asked for
