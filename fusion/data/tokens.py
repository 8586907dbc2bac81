"""A frozen image encoder's tokens of every tile, computed once and cached on disk.

A frozen ViT gives a tile the same tokens in every epoch, fold and run: they are computed once
(:func:`encode_tiles`), rounded to float16 and cached under a key of the encoder and the tiles
(:func:`cached_image_tokens`); training then reads them instead of decoding tiles
(:class:`fusion.data.datasets.WithImageTokens`). The encoder arrives as a function: the data
layer does not know the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Dataset

from fusion.data.cache import Allocate, cache_key, cached_arrays
from fusion.data.samples import Sample

Encode = Callable[[torch.Tensor], torch.Tensor]  # images (B, C, S, S) -> tokens (B, N, D)


@torch.no_grad()
def encode_tiles(
    dataset: Dataset[Sample],
    encode: Encode,
    allocate: Allocate = lambda _, shape, dtype: np.zeros(shape, dtype),
    batch_size: int = 16,
) -> np.ndarray:
    """Tokens of every row's tile, ``(N, 1 + G*G, D)`` float16 by ``index`` (a row without a
    tile gets the tokens of its all-zero input; the model does not read them), written batch by
    batch into an array from ``allocate`` (in memory by default, or a cache file)."""
    # Its own generator: computing tokens must not move the global RNG, or a run with a cold
    # cache would train differently from the same run with a warm one.
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    out: np.ndarray | None = None
    for batch in track(loader, description="ViT tokens (frozen, cached)"):
        tokens = encode(batch["image"]).cpu().numpy().astype(np.float16)
        if out is None:
            out = allocate("tokens", (len(dataset), *tokens.shape[1:]), np.float16)
        out[batch["index"].numpy()] = tokens
    assert out is not None, "no tiles to encode"
    return out


def cached_image_tokens(
    dataset: Dataset[Sample],
    encode: Encode,
    identity: Sequence[Any],
    *,
    cache_dir: str | PathLike[str] | None = None,
) -> tuple[np.ndarray, float]:
    """The tokens of :func:`encode_tiles` from the cache under a key of ``identity`` (the
    encoder's and the tiles': config, weights, normalisation, files), memory-mapped, or computed
    and cached; and the seconds spent computing them (0 on a cache hit)."""
    key = cache_key("vit-tokens-v1", *identity)

    def build(allocate: Allocate) -> None:
        encode_tiles(dataset, encode, allocate)

    start = time.perf_counter()
    arrays, hit = cached_arrays("vit-tokens", key, build, cache_dir=cache_dir)
    return arrays["tokens"], 0.0 if hit else time.perf_counter() - start
