"""Cross-attention fusion after MsIFT.

Zhang, Jiang, Xu, Ni, Huo, Pan, "MsIFT: Multi-Source Image Fusion Transformer", Remote Sensing
14(16):4062, 2022. https://doi.org/10.3390/rs14164062

Each source's tokens act as the queries of a transformer decoder whose memory is the other source's
encoded tokens, so every token can gather non-local evidence from the other source regardless of
spatial (or temporal) alignment. Here the two sources are the image tokens of a ViT and the day
tokens of a series encoder; two decoder stacks run side by side (image queries series, series
queries image) and their pooled outputs are concatenated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusion.models.blocks import FeedForward, MaskedAttention, masked_mean


class CrossAttentionDecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention, cross-attention to memory, feed-forward.

    ``x + SA(LN x)``, then ``x + CA(LN x, LN memory)``, then ``x + FFN(LN x)``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MaskedAttention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.cross_attn = MaskedAttention(dim, heads, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        x_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """Update the query stream.

        Args:
            x: query stream, ``(B, N_q, dim)``.
            memory: the other source's encoded tokens, ``(B, N_m, dim)``.
            x_mask: ``(B, N_q)`` bool, ``True`` = valid (keys of the self-attention).
            memory_mask: ``(B, N_m)`` bool, ``True`` = valid; a row with no valid memory token
                gets no cross-attention update.

        Returns:
            ``(B, N_q, dim)``.
        """
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, x_mask)
        x = x + self.cross_attn(self.norm_cross(x), self.norm_memory(memory), memory_mask)
        return x + self.ffn(self.norm_ffn(x))


class MsIFTFusion(nn.Module):
    """Bidirectional cross-attention fusion of image tokens and series tokens.

    Both inputs are linearly projected to ``dim``. ``depth`` decoder layers update the image
    stream with the projected series tokens as memory, and another ``depth`` layers update the
    series stream with the projected image tokens as memory; the memories are the encoded
    (projected) tokens, fixed across layers as in a transformer decoder. Each stream is
    layer-normed, mean-pooled over its valid tokens, and the two vectors are concatenated.

    Output: ``(B, out_dim)`` with ``out_dim = 2 * dim`` (image part first).
    """

    def __init__(
        self,
        image_dim: int,
        series_dim: int,
        dim: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.out_dim = 2 * dim
        self.image_proj = nn.Linear(image_dim, dim)
        self.series_proj = nn.Linear(series_dim, dim)
        self.image_layers = nn.ModuleList(
            CrossAttentionDecoderLayer(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.series_layers = nn.ModuleList(
            CrossAttentionDecoderLayer(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.image_norm = nn.LayerNorm(dim)
        self.series_norm = nn.LayerNorm(dim)

    def forward(
        self,
        image_tokens: Tensor,
        series_tokens: Tensor,
        image_mask: Tensor | None = None,
        series_mask: Tensor | None = None,
    ) -> Tensor:
        """Fuse.

        Args:
            image_tokens: ``(B, N_i, image_dim)``.
            series_tokens: ``(B, N_s, series_dim)``.
            image_mask: ``(B, N_i)`` bool, ``True`` = valid; ``None`` = all valid.
            series_mask: ``(B, N_s)`` bool, ``True`` = valid; ``None`` = all valid.

        Returns:
            ``(B, 2 * dim)``: pooled image stream, then pooled series stream.
        """
        image_memory = self.image_proj(image_tokens)
        series_memory = self.series_proj(series_tokens)
        x_image, x_series = image_memory, series_memory
        for layer in self.image_layers:
            x_image = layer(x_image, series_memory, image_mask, series_mask)
        for layer in self.series_layers:
            x_series = layer(x_series, image_memory, series_mask, image_mask)
        pooled_image = masked_mean(self.image_norm(x_image), image_mask)
        pooled_series = masked_mean(self.series_norm(x_series), series_mask)
        return torch.cat([pooled_image, pooled_series], dim=-1)
