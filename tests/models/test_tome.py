"""Token merging (ToMe) in the frozen ViT: off is bit-identical, merging removes the tokens it
says, keeps every patch accounted for, and stays close to the exact tokens on real tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fusion.models.tome import bipartite_merge, merged_tokens, tokens_per_block
from fusion.models.vit import ViTEncoder


@pytest.fixture(scope="module")
def encoder(vit_weights: Path) -> ViTEncoder:
    return ViTEncoder(weights=str(vit_weights), img_size=112, token_grid=4).eval()


@pytest.fixture(scope="module")
def tiles(shared_data: Path) -> torch.Tensor:
    """Four real AID tiles, 112 px, ImageNet-normalised."""
    paths = sorted((shared_data / "aid").rglob("*.jpg"))[::300][:4]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((112, 112))) for p in paths]
    x = torch.tensor(np.stack(arrays), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def test_off_is_bit_identical(encoder: ViTEncoder, tiles: torch.Tensor) -> None:
    with torch.inference_mode():
        exact = encoder.frozen_part(tiles)
        encoder.merge = 0
        assert torch.equal(encoder.frozen_part(tiles), exact)
        # Merging nothing through the ToMe path is the same computation (up to rounding).
        unmerged = merged_tokens(encoder.backbone, tiles, r=0, blocks=12)
        torch.testing.assert_close(
            unmerged, encoder.backbone.forward_features(tiles), atol=1e-4, rtol=1e-4
        )


def test_merging_reads_fewer_tokens_per_block(encoder: ViTEncoder, tiles: torch.Tensor) -> None:
    seen: list[int] = []
    hooks = [
        block.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
        for block in encoder.backbone.blocks
    ]
    try:
        with torch.inference_mode():
            encoder.merge = 10
            out = encoder.frozen_part(tiles)
    finally:
        encoder.merge = 0
        for hook in hooks:
            hook.remove()
    # 64 patches (8 x 8): at most half of those left can go in a block.
    expected = tokens_per_block(64, 10, 12)
    assert expected[:4] == [54, 44, 34, 24] and expected[4:6] == [14, 7] and expected[-1] == 1
    assert seen == [1 + n for n in expected]  # the CLS token is never merged
    assert out.shape == (4, 17, 384)  # given back on the grid, pooled as before


def test_merging_stays_close_to_the_exact_tokens(encoder: ViTEncoder, tiles) -> None:
    with torch.inference_mode():
        exact = encoder.frozen_part(tiles)
        similarity = []
        for r in (2, 4, 8):
            encoder.merge = r
            merged = encoder.frozen_part(tiles)
            similarity.append(F.cosine_similarity(merged[:, 0], exact[:, 0]).min().item())
        encoder.merge = 0
    assert similarity[0] > 0.95 and similarity[0] >= similarity[-1]  # CLS of real tiles


def test_bipartite_merge_by_hand() -> None:
    # CLS, then patches p0..p3 (A = p0, p2; B = p1, p3). p2 equals p3 exactly: with r = 1 it is
    # the one merged, into p3, the two averaged by size (p2 holds 3 patches, p3 one).
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    x[0, 3] = torch.tensor([2.0, 2.0])  # same direction as p3: cosine similarity 1
    size = torch.tensor([[1.0, 1.0, 1.0, 3.0, 1.0]])
    where = torch.tensor([[1, 2, 3, 4]])  # original patch -> token
    new_x, new_size, new_where = bipartite_merge(x, x, size, where, r=1, prefix=1)
    # Kept: CLS, A's p0, then B's p1 and p3 (p2 merged into it).
    torch.testing.assert_close(new_x[0], torch.tensor(
        [[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [(3 * 2.0 + 1.0) / 4, (3 * 2.0 + 1.0) / 4]]
    ))  # fmt: skip
    assert new_size.tolist() == [[1.0, 1.0, 1.0, 4.0]]  # every patch still counted
    assert new_where.tolist() == [[1, 2, 3, 3]]  # p2 and p3 now live in the same token
    # Never more than half of the patches in one step; r = 0 changes nothing.
    assert bipartite_merge(x, x, size, where, r=10, prefix=1)[0].shape[1] == 3
    assert bipartite_merge(x, x, size, where, r=0, prefix=1)[0] is x
