"""Bottleneck fusion after MBT.

Nagrani, Yang, Arnab, Jansen, Schmid, Sun, "Attention Bottlenecks for Multimodal Fusion",
NeurIPS 2021. https://arxiv.org/abs/2107.00135

Each modality keeps its own transformer. From layer ``fusion_layer`` on, a few shared bottleneck
tokens are appended to each modality's tokens; each modality's block updates its own copy of them,
the copies are averaged, and the average is carried to the next layer. Cross-modal information
therefore flows only through the bottleneck: a modality's tokens never attend to the other
modality's tokens. Following the paper's update rule, the image tokens of layer ``l + 1`` first see
what the series tokens wrote at layer ``l``, so with ``fusion_layer >= depth - 1`` the pooled
output carries no cross-modal information.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.models.blocks import SelfAttentionBlock, masked_mean

FUSION_DEPTH_NAMES = ("early", "mid", "late")


def fusion_layer_for(depth_name: str, depth: int) -> int:
    """The first fused layer for a named fusion depth.

    ``early`` is ``0``, ``mid`` is ``depth // 2`` and ``late`` is ``depth`` (no fused layer).

    Raises:
        ValueError: ``depth_name`` is not one of :data:`FUSION_DEPTH_NAMES`.
    """
    layers = {"early": 0, "mid": depth // 2, "late": depth}
    if depth_name not in layers:
        raise ValueError(
            f"unknown fusion depth {depth_name!r}; choose one of {', '.join(FUSION_DEPTH_NAMES)}"
        )
    return layers[depth_name]


def _with_bottleneck(mask: Tensor | None, n_bottlenecks: int) -> Tensor | None:
    """Extend a ``(B, N)`` token mask with ``n_bottlenecks`` always-valid entries."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_ones(mask.shape[0], n_bottlenecks)], dim=1)


class BottleneckFusion(nn.Module):
    """Two per-modality transformers that exchange information only through bottleneck tokens.

    Both inputs are linearly projected to ``dim`` and run through ``depth`` pre-norm blocks, with
    separate weights per modality. Layers ``l < fusion_layer`` process each modality alone; layers
    ``l >= fusion_layer`` process ``[own tokens, bottleneck tokens]`` per modality and average the
    two updated bottleneck copies. ``fusion_layer = 0`` is early, ``depth // 2`` mid and ``depth``
    late fusion (no exchange at all). Each stream is layer-normed and mean-pooled over its valid
    tokens; the two vectors are concatenated.

    Output: ``(B, out_dim)`` with ``out_dim = 2 * dim`` (image part first) for every
    ``fusion_layer``.
    """

    def __init__(
        self,
        image_dim: int,
        series_dim: int,
        dim: int = 256,
        depth: int = 4,
        fusion_layer: int = 2,
        n_bottlenecks: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0 <= fusion_layer <= depth:
            raise ValueError(
                f"fusion_layer must be in [0, {depth}] for depth {depth}, got {fusion_layer}"
            )
        if n_bottlenecks < 1:
            raise ValueError(f"n_bottlenecks must be >= 1, got {n_bottlenecks}")
        self.fusion_layer = fusion_layer
        self.out_dim = 2 * dim
        self.image_proj = nn.Linear(image_dim, dim)
        self.series_proj = nn.Linear(series_dim, dim)
        self.image_blocks = nn.ModuleList(
            SelfAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.series_blocks = nn.ModuleList(
            SelfAttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        # Late fusion never uses bottleneck tokens: no parameter that would get no gradient.
        self.bottleneck = (
            nn.Parameter(torch.randn(1, n_bottlenecks, dim) * 0.02)
            if fusion_layer < depth
            else None
        )
        self.image_norm = nn.LayerNorm(dim)
        self.series_norm = nn.LayerNorm(dim)

    def forward(
        self,
        image_tokens: Tensor,
        series_tokens: Tensor,
        image_mask: Tensor | None = None,
        series_mask: Tensor | None = None,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Fuse.

        Args:
            image_tokens: ``(B, N_i, image_dim)``.
            series_tokens: ``(B, N_s, series_dim)``.
            image_mask: ``(B, N_i)`` bool, ``True`` = valid; ``None`` = all valid.
            series_mask: ``(B, N_s)`` bool, ``True`` = valid; ``None`` = all valid.
            return_tokens: also return each modality's output token stream.

        Returns:
            ``(B, 2 * dim)``; with ``return_tokens`` the tuple ``(fused, image_out, series_out)``
            where ``image_out`` is ``(B, N_i, dim)`` and ``series_out`` is ``(B, N_s, dim)``
            (layer-normed, before pooling, bottleneck tokens excluded).
        """
        x_image = self.image_proj(image_tokens)
        x_series = self.series_proj(series_tokens)
        n_image, n_series = x_image.shape[1], x_series.shape[1]
        bottleneck = None
        for layer, (image_block, series_block) in enumerate(
            zip(self.image_blocks, self.series_blocks, strict=True)
        ):
            if layer < self.fusion_layer:
                x_image = image_block(x_image, image_mask)
                x_series = series_block(x_series, series_mask)
                continue
            if bottleneck is None:
                bottleneck = self.bottleneck.expand(x_image.shape[0], -1, -1)
            n_b = bottleneck.shape[1]
            image_out = image_block(
                torch.cat([x_image, bottleneck], dim=1), _with_bottleneck(image_mask, n_b)
            )
            series_out = series_block(
                torch.cat([x_series, bottleneck], dim=1), _with_bottleneck(series_mask, n_b)
            )
            x_image, image_bottleneck = image_out.split([n_image, n_b], dim=1)
            x_series, series_bottleneck = series_out.split([n_series, n_b], dim=1)
            bottleneck = (image_bottleneck + series_bottleneck) / 2
        x_image = self.image_norm(x_image)
        x_series = self.series_norm(x_series)
        fused = torch.cat(
            [masked_mean(x_image, image_mask), masked_mean(x_series, series_mask)], dim=-1
        )
        if return_tokens:
            return fused, x_image, x_series
        return fused
