"""Tests for the image branch: the timm ViT encoder on the real DINOv2 ViT-S/14 weights file.

Nothing here touches the network (``weights="hub"`` would download): pretrained models load the
local safetensors file from the shared bundle. Each model is built once per module (about 2 s
each on CPU) and inputs are kept small; only the real-imagery check runs at 224 px.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor
from torch.nn import functional as F

from fusion.data.tiles import BandStats, prepare_tile, read_tile
from fusion.models.vit import ViTEncoder

DIM = 384  # ViT-S width
DEPTH = 12
PATCH = 14
QKV = "blocks.0.attn.qkv.weight"
IMAGENET_STATS = BandStats(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))
# Two visually distinct AID classes with different project labels (residential vs railway_station).
AID_CLASSES = ("DenseResidential", "RailwayStation")
PER_CLASS = 3


def build(**kwargs) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(**kwargs).eval()


@pytest.fixture(scope="module")
def file_state(vit_weights: Path) -> dict[str, Tensor]:
    return load_file(str(vit_weights))


@pytest.fixture(scope="module")
def pretrained(vit_weights: Path) -> ViTEncoder:
    """Frozen pretrained encoder at 224 px (16 x 16 patch grid) pooled to 4 x 4 tokens."""
    return build(weights=str(vit_weights), img_size=224, freeze="all", token_grid=4)


@pytest.fixture(scope="module")
def pretrained_84(vit_weights: Path) -> ViTEncoder:
    """Pretrained encoder on 84 px tiles (6 x 6 grid) keeping every patch token, with the patch
    embedding and blocks 0..9 frozen (blocks 10, 11 and the final norm trainable)."""
    return build(weights=str(vit_weights), img_size=84, token_grid=None, freeze=10)


@pytest.fixture(scope="module")
def random_none() -> ViTEncoder:
    """Randomly initialized, fully trainable encoder on 56 px tiles."""
    return build(weights=None, img_size=56, freeze="none")


@pytest.fixture(scope="module")
def aid_batch(shared_data: Path) -> tuple[Tensor, Tensor]:
    """Six real AID tiles (3 per class, first files by name), ImageNet-normalized, 224 px."""
    images, labels = [], []
    for label, aid_class in enumerate(AID_CLASSES):
        files = sorted((shared_data / "aid" / aid_class).glob("*.jpg"))[:PER_CLASS]
        assert len(files) == PER_CLASS, f"too few {aid_class} tiles in the bundle"
        for path in files:
            images.append(prepare_tile(read_tile(path), size=224, stats=IMAGENET_STATS))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def aid_features(pretrained: ViTEncoder, aid_batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    # Under grad mode on purpose: the frozen encoder must not build a graph (checked below).
    with torch.enable_grad():
        return pretrained(aid_batch[0])


def class_margin(pooled: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cosine similarity within class (off-diagonal) and across classes."""
    unit = F.normalize(pooled, dim=1)
    sim = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(labels), dtype=torch.bool)
    return sim[same & off_diag].mean().item(), sim[~same].mean().item()


# --- weights ----------------------------------------------------------------------------------


def test_weights_come_from_the_file(
    pretrained: ViTEncoder, random_none: ViTEncoder, file_state: dict[str, Tensor]
) -> None:
    expected = file_state[QKV]
    assert expected.shape == (3 * DIM, DIM)
    loaded = dict(pretrained.backbone.named_parameters())
    assert torch.equal(loaded[QKV], expected)
    assert torch.equal(loaded["norm.weight"], file_state["norm.weight"])
    # A randomly initialized encoder differs: the equality above is not trivially true.
    random_qkv = dict(random_none.backbone.named_parameters())[QKV]
    assert not torch.allclose(random_qkv, expected, atol=1e-3)


def test_missing_weights_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_weights.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ViTEncoder(weights=str(missing))


# --- shapes -----------------------------------------------------------------------------------


def test_pooled_grid_tokens_shape(
    pretrained: ViTEncoder, aid_features: tuple[Tensor, Tensor]
) -> None:
    tokens, pooled = aid_features
    assert pretrained.out_dim == DIM
    assert pretrained.num_tokens == 1 + 4 * 4
    assert tokens.shape == (2 * PER_CLASS, 17, DIM)
    assert pooled.shape == (2 * PER_CLASS, DIM)
    assert torch.equal(pooled, tokens[:, 0])
    assert torch.isfinite(tokens).all()


def test_pool_tokens_averages_grid_cells_in_row_major_order(pretrained: ViTEncoder) -> None:
    # Backbone output with a CLS token and a 16 x 16 patch grid whose features encode position.
    side = 224 // PATCH
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patches = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()  # (256, 2)
    feats = torch.cat([torch.full((1, 2), -7.0), patches])[None].repeat(2, 1, 1)
    tokens, pooled = pretrained.pool_tokens(feats)
    assert tokens.shape == (2, 17, 2)
    assert torch.equal(pooled, torch.full((2, 2), -7.0))
    # Token 1 + 4r + c averages patch rows 4r..4r+3, columns 4c..4c+3: centre (4r+1.5, 4c+1.5).
    centres = torch.tensor([[4 * r + 1.5, 4 * c + 1.5] for r in range(4) for c in range(4)])
    assert torch.allclose(tokens[0, 1:], centres)


def test_other_tile_size_resamples_position_embedding(
    pretrained_84: ViTEncoder, file_state: dict[str, Tensor]
) -> None:
    backbone = pretrained_84.backbone
    assert pretrained_84.grid == (6, 6)
    assert backbone.pos_embed.shape == (1, 1 + 36, DIM)
    # The file holds the 37 x 37 (518 px) grid; the model holds it resampled to 6 x 6, not random.
    assert file_state["pos_embed"].shape == (1, 1 + 37 * 37, DIM)
    expected = resample_abs_pos_embed(file_state["pos_embed"], new_size=(6, 6), num_prefix_tokens=1)
    assert torch.allclose(backbone.pos_embed, expected, atol=1e-6)
    assert torch.equal(dict(backbone.named_parameters())[QKV], file_state[QKV])

    images = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, pooled = pretrained_84(images)
    assert pretrained_84.num_tokens == 1 + (84 // PATCH) ** 2
    assert tokens.shape == (2, 1 + 36, DIM)
    assert torch.equal(pooled, tokens[:, 0])
    assert torch.isfinite(tokens).all()


def test_four_bands_adapt_the_three_band_weights(
    vit_weights: Path, file_state: dict[str, Tensor]
) -> None:
    encoder = build(weights=str(vit_weights), in_chans=4, img_size=56)
    weight = encoder.backbone.patch_embed.proj.weight
    assert weight.shape == (DIM, 4, PATCH, PATCH)
    # timm repeats the RGB filters over the bands and rescales by 3/4 (same response to grey).
    rgb = file_state["patch_embed.proj.weight"]
    assert torch.allclose(weight[:, :3], rgb * 3 / 4)
    assert torch.allclose(weight[:, 3], rgb[:, 0] * 3 / 4)
    assert torch.equal(dict(encoder.backbone.named_parameters())[QKV], file_state[QKV])

    with torch.no_grad():
        tokens, pooled = encoder(torch.randn(2, 4, 56, 56))
    assert tokens.shape == (2, 17, DIM)
    assert pooled.shape == (2, DIM)
    assert torch.isfinite(tokens).all()


# --- real imagery -----------------------------------------------------------------------------


def test_pretrained_features_group_real_aid_tiles_by_class(
    aid_features: tuple[Tensor, Tensor],
    aid_batch: tuple[Tensor, Tensor],
    random_none: ViTEncoder,
) -> None:
    images, labels = aid_batch
    within, across = class_margin(aid_features[1], labels)
    # Measured: within 0.63, across 0.56 (margin 0.06; random 3+3 subsets of the first 20 files
    # per class: 99 % positive, mean margin 0.15).
    assert within > across + 0.02, (within, across)
    # Contrast: the random-init CLS output barely depends on the image (cosine ~1 everywhere).
    with torch.no_grad():
        _, random_pooled = random_none(F.interpolate(images, size=56, mode="bilinear"))
    r_within, r_across = class_margin(random_pooled, labels)
    assert r_within - r_across < (within - across) / 2, (r_within, r_across)


# --- freezing ---------------------------------------------------------------------------------


def test_freeze_all_has_no_trainable_parameters_and_no_graph(
    pretrained: ViTEncoder, aid_features: tuple[Tensor, Tensor]
) -> None:
    assert pretrained.frozen
    assert not any(p.requires_grad for p in pretrained.parameters())
    assert pretrained.param_groups(1e-3, 0.75) == []
    tokens, pooled = aid_features  # computed with grad mode enabled
    assert not tokens.requires_grad and tokens.grad_fn is None
    assert not pooled.requires_grad


def test_train_keeps_a_frozen_backbone_in_eval_mode(pretrained: ViTEncoder) -> None:
    try:
        pretrained.train()
        assert pretrained.training
        assert not any(m.training for m in pretrained.backbone.modules())
    finally:
        pretrained.eval()


def test_freeze_none_trains_everything(random_none: ViTEncoder) -> None:
    assert not random_none.frozen
    assert all(p.requires_grad for p in random_none.parameters())
    try:
        random_none.train()
        assert all(m.training for m in random_none.backbone.modules())
    finally:
        random_none.eval()
    tokens, pooled = random_none(torch.randn(1, 3, 56, 56))
    assert tokens.requires_grad and tokens.grad_fn is not None
    assert pooled.requires_grad


def test_freeze_k_freezes_embeddings_and_first_k_blocks(pretrained_84: ViTEncoder) -> None:
    named = dict(pretrained_84.backbone.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    expected = {n for n in named if n.startswith(("blocks.10.", "blocks.11.", "norm."))}
    assert trainable == expected
    assert {"norm.weight", "norm.bias", "blocks.11.attn.qkv.weight"} <= trainable
    assert not named["patch_embed.proj.weight"].requires_grad
    assert not named["pos_embed"].requires_grad and not named["cls_token"].requires_grad
    assert not named["blocks.9.mlp.fc2.weight"].requires_grad
    assert not pretrained_84.frozen


def test_frozen_and_trainable_parts_compose_to_the_whole_backbone(
    pretrained_84: ViTEncoder,
) -> None:
    """With every patch token kept, caching after block k changes nothing: the trained tail on
    the cached tokens gives the backbone's own output, and only the tail gets gradients."""
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        whole = pretrained_84.backbone.forward_features(x)
    cached = pretrained_84.frozen_part(x)
    assert cached.shape == (2, 1 + 36, DIM) and not cached.requires_grad
    tokens = pretrained_84.trainable_part(cached)
    assert torch.allclose(tokens, whole, atol=1e-5)
    tokens.sum().backward()
    grads = {n for n, p in pretrained_84.backbone.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("blocks.10.", "blocks.11.", "norm.")) for n in grads)
    pretrained_84.zero_grad(set_to_none=True)


def test_partial_fine_tuning_on_the_pooled_grid_is_cheap_and_keyed_by_the_cut(
    vit_weights: Path,
) -> None:
    encoder = build(weights=str(vit_weights), img_size=56, token_grid=2, freeze=11)
    cached = encoder.frozen_part(torch.randn(2, 3, 56, 56))
    assert cached.shape == (2, 1 + 4, DIM)  # the last block reads 5 pooled tokens, not 17
    assert encoder.trainable_part(cached).shape == (2, 5, DIM)
    assert encoder.cacheable and not encoder.frozen
    assert encoder.config["frozen_blocks"] == 11  # cached tokens of another cut never mix
    assert "frozen_blocks" not in build(weights=None, img_size=56, freeze="all").config


@pytest.mark.parametrize("freeze", [DEPTH + 1, -1])
def test_freeze_out_of_range_raises(freeze: int) -> None:
    with pytest.raises(ValueError, match="freeze"):
        ViTEncoder(weights=None, img_size=28, freeze=freeze)


# --- layer-wise learning-rate decay -----------------------------------------------------------


def group_of(groups: list[dict], param: Tensor) -> dict:
    (match,) = [g for g in groups if any(p is param for p in g["params"])]
    return match


def assert_each_trainable_once(encoder: ViTEncoder, groups: list[dict]) -> None:
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in encoder.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter appears in two groups"
    assert sorted(grouped) == sorted(trainable)


def test_param_groups_layer_decay_fully_trainable(random_none: ViTEncoder) -> None:
    lr, decay = 1e-3, 0.5
    groups = random_none.param_groups(lr, decay)
    named = dict(random_none.backbone.named_parameters())
    assert len(groups) == DEPTH + 2  # embeddings, 12 blocks, final norm
    assert group_of(groups, named["norm.weight"])["lr"] == pytest.approx(lr)
    assert group_of(groups, named["blocks.11.mlp.fc1.weight"])["lr"] == pytest.approx(lr * decay)
    assert group_of(groups, named["blocks.0.attn.qkv.weight"])["lr"] == pytest.approx(
        lr * decay**DEPTH
    )
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert group_of(groups, named[name])["lr"] == pytest.approx(lr * decay ** (DEPTH + 1))
    assert_each_trainable_once(random_none, groups)
    # layer_decay=1 gives every group the base rate.
    assert {g["lr"] for g in random_none.param_groups(lr)} == {lr}


def test_param_groups_partially_frozen(pretrained_84: ViTEncoder) -> None:
    lr, decay = 2e-4, 0.8
    groups = pretrained_84.param_groups(lr, decay)
    named = dict(pretrained_84.backbone.named_parameters())
    assert len(groups) == 3
    assert [g["lr"] for g in groups] == pytest.approx([lr * decay**2, lr * decay, lr])
    assert group_of(groups, named["blocks.10.attn.proj.weight"]) is groups[0]
    assert group_of(groups, named["blocks.11.norm1.weight"]) is groups[1]
    assert group_of(groups, named["norm.bias"]) is groups[2]
    assert_each_trainable_once(pretrained_84, groups)


def test_param_groups_put_pre_norm_with_the_embeddings() -> None:
    # CLIP-style ViTs have ``norm_pre`` right after the embeddings: it must get the embedding rate,
    # not the final-norm rate (a prefix match on "norm" would confuse the two).
    encoder = build(name="vit_xsmall_patch16_clip_224", weights=None, img_size=32, freeze="none")
    depth = len(encoder.backbone.blocks)
    lr, decay = 1.0, 0.5
    groups = encoder.param_groups(lr, decay)
    named = dict(encoder.backbone.named_parameters())
    assert "norm_pre.weight" in named
    assert group_of(groups, named["norm_pre.weight"])["lr"] == pytest.approx(decay ** (depth + 1))
    assert group_of(groups, named["patch_embed.proj.weight"])["lr"] == pytest.approx(
        decay ** (depth + 1)
    )
    assert group_of(groups, named["norm.weight"])["lr"] == pytest.approx(lr)
    assert_each_trainable_once(encoder, groups)
