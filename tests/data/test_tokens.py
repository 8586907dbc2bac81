"""Frozen image tokens in the data layer: computed once per tile, cached, served in the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.data.cache import cache_key, file_fingerprint
from fusion.data.datamodule import FusionDataModule


def small_dm(manifest: Path, shared_data: Path, cache: Path) -> FusionDataModule:
    dm = FusionDataModule(
        manifest=str(manifest),
        series=str(shared_data / "footfall" / "counts.csv.gz"),
        image_size=28,
        batch_size=8,
        cache_dir=str(cache),
    )
    dm.setup()
    return dm


class CountingEncoder:
    """A stand-in frozen encoder: tokens ``(B, 2, 3)`` from each image's channel means."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        means = images.mean(dim=(2, 3))  # (B, C)
        return torch.stack([means, -means], dim=1)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_tokens_are_served_in_the_batch_in_place_of_the_tiles(
    small_manifest: Path, shared_data: Path, cache: Path
) -> None:
    dm = small_dm(small_manifest, shared_data, cache)
    encoder = CountingEncoder()
    images = next(iter(dm.val_dataloader()))  # decoded tiles, as the encoder saw them
    dm.use_image_tokens(encoder, ["stand-in", 1])
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].numel() == 0 and batch["image_tokens"].dtype == torch.float16
    assert torch.equal(batch["index"], images["index"])
    expected = encoder(images["image"]).half()
    assert torch.equal(batch["image_tokens"], expected)
    # The training rows are served the same way; the other settings of a sample are untouched.
    train = dm.dataset("train")[0]
    assert train["image_tokens"].shape == (2, 3) and train["has_image"] and train["label"] >= 0
    dm.drop_image_tokens()
    assert dm.dataset("val")[0]["image"].shape == (3, 28, 28)


def test_tokens_are_computed_once_per_tile_and_identity(
    small_manifest: Path, shared_data: Path, cache: Path
) -> None:
    encoder = CountingEncoder()
    dm = small_dm(small_manifest, shared_data, cache)
    dm.use_image_tokens(encoder, ["stand-in", 1])
    calls = encoder.calls
    assert calls > 0 and dm.token_seconds > 0
    dm.use_image_tokens(encoder, ["stand-in", 1])  # every validation epoch: nothing to do
    again = small_dm(small_manifest, shared_data, cache)  # another run: from the disk cache
    again.use_image_tokens(encoder, ["stand-in", 1])
    assert encoder.calls == calls and again.token_seconds == 0
    assert np.array_equal(again.image_tokens, dm.image_tokens)
    again.use_image_tokens(encoder, ["stand-in", 2])  # another encoder: computed anew
    assert encoder.calls == 2 * calls


def test_the_cache_key_is_the_one_earlier_versions_wrote(
    small_manifest: Path, shared_data: Path, cache: Path
) -> None:
    """Caches written before the tokens moved into the data layer are still found: the key is
    made of the same parts, in the same order (an earlier version's ``.npz`` entry under that
    key is read, see ``tests/data/test_cache.py``)."""
    dm = small_dm(small_manifest, shared_data, cache)
    dm.use_image_tokens(CountingEncoder(), [{"name": "vit"}, "weights"])
    files = [None if p is None else file_fingerprint(p) for p in dm.image_paths]
    key = cache_key(
        "vit-tokens-v1",
        {"name": "vit"},
        "weights",
        [dm.band_stats.to_dict(), dm.bands, dm.nodata],
        files,
    )
    assert [p.name for p in cache.glob("vit-tokens-*")] == [f"vit-tokens-{key}"]
