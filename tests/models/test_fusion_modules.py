"""Tests for the token-fusion modules: MsIFT cross-attention and MBT bottleneck fusion."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fusion.models.blocks import MaskedAttention, masked_mean
from fusion.models.mbt import FUSION_DEPTH_NAMES, BottleneckFusion, fusion_layer_for
from fusion.models.msift import MsIFTFusion

B, N_I, N_S, D_I, D_S, DIM = 3, 7, 5, 12, 6, 16


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N_I, D_I, generator=g), torch.randn(B, N_S, D_S, generator=g)


def _mbt(depth: int, fusion_layer: int, n_bottlenecks: int = 2) -> BottleneckFusion:
    torch.manual_seed(0)
    model = BottleneckFusion(
        D_I,
        D_S,
        dim=DIM,
        depth=depth,
        fusion_layer=fusion_layer,
        n_bottlenecks=n_bottlenecks,
        heads=2,
    )
    return model.eval()


def _msift(depth: int = 2) -> MsIFTFusion:
    torch.manual_seed(0)
    return MsIFTFusion(D_I, D_S, dim=DIM, depth=depth, heads=2).eval()


def _partial_masks() -> tuple[Tensor, Tensor]:
    """Masks with a few invalid image and series tokens."""
    image_mask = torch.ones(B, N_I, dtype=torch.bool)
    image_mask[:, -2:] = False
    series_mask = torch.ones(B, N_S, dtype=torch.bool)
    series_mask[0, 1] = series_mask[2, 3:] = False
    return image_mask, series_mask


def _perturb_masked(
    image: Tensor, series: Tensor, image_mask: Tensor, series_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Copies of the inputs with new values at the invalid tokens only."""
    image, series = image.clone(), series.clone()
    image[~image_mask] += 5.0
    series[~series_mask] -= 5.0
    return image, series


def test_masked_mean_ignores_invalid_and_zeroes_empty_rows() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert torch.equal(masked_mean(x, mask), torch.tensor([[2.0], [0.0]]))
    assert torch.equal(masked_mean(x), x.mean(dim=1))


def test_masked_attention_all_masked_memory_gives_zero() -> None:
    attn = MaskedAttention(DIM, 2).eval()
    q, m = torch.randn(2, 3, DIM), torch.randn(2, 4, DIM)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    out = attn(q, m, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(3, DIM))


@pytest.mark.parametrize("depth_name", FUSION_DEPTH_NAMES)
def test_shapes_and_out_dim(depth_name: str) -> None:
    image, series = _inputs()
    mbt = _mbt(4, fusion_layer_for(depth_name, 4))
    fused, image_out, series_out = mbt(image, series, return_tokens=True)
    assert mbt.out_dim == 2 * DIM
    assert fused.shape == (B, mbt.out_dim)
    assert image_out.shape == (B, N_I, DIM) and series_out.shape == (B, N_S, DIM)
    msift = _msift()
    assert msift.out_dim == 2 * DIM
    assert msift(image, series).shape == (B, msift.out_dim)


def test_fusion_layer_for_names_and_errors() -> None:
    assert [fusion_layer_for(name, 4) for name in FUSION_DEPTH_NAMES] == [0, 2, 4]
    assert fusion_layer_for("mid", 5) == 2
    with pytest.raises(ValueError, match="early, mid, late"):
        fusion_layer_for("middle", 4)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="fusion_layer"):
            BottleneckFusion(D_I, D_S, dim=DIM, depth=4, fusion_layer=bad, heads=2)


@torch.no_grad()
@pytest.mark.parametrize(
    ("fusion_layer", "crosses"), [(0, True), (2, True), (3, False), (4, False)]
)
def test_mbt_series_reaches_image_stream_only_when_fused_early_enough(
    fusion_layer: int, crosses: bool
) -> None:
    """Late fusion (4) keeps streams apart; at fusion layer 3 the bottleneck written by the last
    layer is discarded, so series information cannot reach the image tokens either. A direct
    cross-attention between the modalities would leak at layer 3."""
    model = _mbt(4, fusion_layer)
    image, series = _inputs()
    _, image_a, series_a = model(image, series, return_tokens=True)
    _, image_b, _ = model(image, series + 1.0, return_tokens=True)
    _, _, series_c = model(image + 1.0, series, return_tokens=True)
    assert torch.equal(image_a, image_b) is not crosses
    assert torch.equal(series_a, series_c) is not crosses


@torch.no_grad()
def test_mbt_mid_layers_before_fusion_are_unaffected() -> None:
    model = _mbt(4, fusion_layer=2)
    outputs: list[Tensor] = []
    hooks = [
        model.image_blocks[i].register_forward_hook(lambda _m, _a, out: outputs.append(out))
        for i in range(2)
    ]
    image, series = _inputs()
    _, image_a, _ = model(image, series, return_tokens=True)
    _, image_b, _ = model(image, series * 3.0, return_tokens=True)
    for hook in hooks:
        hook.remove()
    first, second = outputs[:2], outputs[2:]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(image_a, image_b)


@torch.no_grad()
def test_mbt_attention_is_within_modality_plus_bottleneck() -> None:
    n_b = 3
    model = _mbt(3, fusion_layer=1, n_bottlenecks=n_b)
    seen: list[tuple[str, int, int, bool]] = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedAttention):
            module.register_forward_hook(
                lambda _m, args, _out, name=name: seen.append(
                    (name, args[0].shape[1], args[1].shape[1], args[0] is args[1])
                )
            )
    model(*_inputs())
    keys = {name: (n_q, n_k) for name, n_q, n_k, _ in seen}
    assert all(same for *_, same in seen), "every attention must be self-attention"
    assert keys["image_blocks.0.attn"] == (N_I, N_I)
    assert keys["series_blocks.0.attn"] == (N_S, N_S)
    for layer in (1, 2):
        assert keys[f"image_blocks.{layer}.attn"] == (N_I + n_b, N_I + n_b)
        assert keys[f"series_blocks.{layer}.attn"] == (N_S + n_b, N_S + n_b)
    assert model.bottleneck is not None and _mbt(3, fusion_layer=3).bottleneck is None


@torch.no_grad()
@pytest.mark.parametrize(
    "make", [lambda: _mbt(2, 0), lambda: _mbt(2, 2), _msift], ids=["mbt-early", "mbt-late", "msift"]
)
def test_masked_tokens_do_not_influence_output(make) -> None:
    model = make()
    image, series = _inputs()
    image_mask, series_mask = _partial_masks()
    base = model(image, series, image_mask, series_mask)
    changed = model(
        *_perturb_masked(image, series, image_mask, series_mask), image_mask, series_mask
    )
    assert torch.allclose(base, changed, rtol=0.0, atol=1e-6)


@torch.no_grad()
def test_mbt_fully_masked_modality_is_finite() -> None:
    model = _mbt(2, fusion_layer=0)
    image, series = _inputs()
    series_mask = torch.ones(B, N_S, dtype=torch.bool)
    series_mask[0] = False
    assert torch.isfinite(model(image, series, series_mask=series_mask)).all()


@torch.no_grad()
def test_msift_each_stream_depends_on_the_other_source() -> None:
    model = _msift()
    image, series = _inputs()
    base = model(image, series)
    from_series = model(image, series + 1.0)
    from_image = model(image + 1.0, series)
    assert not torch.allclose(base[:, :DIM], from_series[:, :DIM])
    assert not torch.allclose(base[:, DIM:], from_image[:, DIM:])


@torch.no_grad()
def test_msift_memory_is_the_fixed_projected_encoder_tokens() -> None:
    model = _msift(depth=3)
    memories: list[Tensor] = []
    for layer in model.image_layers:
        layer.register_forward_hook(lambda _m, args, _out: memories.append(args[1]))
    image, series = _inputs()
    model(image, series)
    expected = model.series_proj(series)
    assert len(memories) == 3
    assert all(torch.equal(memory, expected) for memory in memories)


@torch.no_grad()
def test_msift_all_masked_memory_is_finite() -> None:
    model = _msift()
    image, series = _inputs()
    series_mask = torch.ones(B, N_S, dtype=torch.bool)
    series_mask[1] = False
    out = model(image, series, series_mask=series_mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["msift", "mbt"])
def test_fully_masked_series_gives_finite_gradients(kind: str) -> None:
    fusion = (_msift() if kind == "msift" else _mbt(2, fusion_layer=1)).train()
    image, series = _inputs()
    series_mask = torch.ones(B, N_S, dtype=torch.bool)
    series_mask[0] = False
    fusion(image, series, series_mask=series_mask).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", ["msift", "mbt"])
def test_few_steps_lower_the_loss(kind: str) -> None:
    torch.manual_seed(1)
    image, series = _inputs(seed=1)
    # Label needs both sources: sign of (image mean) * (series mean).
    target = ((image.mean(dim=(1, 2)) * series.mean(dim=(1, 2))) > 0).long()
    fusion = _msift() if kind == "msift" else _mbt(2, fusion_layer=0)
    head = nn.Linear(fusion.out_dim, 2)
    params = [*fusion.parameters(), *head.parameters()]
    fusion.train()
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(head(fusion(image, series)), target)
        # Plain SGD steps: torch.optim's first step imports torch._dynamo (~5 s).
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= 0.05 * grad
        losses.append(loss.item())
    assert losses[-1] < losses[0]
