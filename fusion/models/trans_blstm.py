"""TRANS-BLSTM: a transformer encoder with a bidirectional LSTM inside every block.

Zhiheng Huang, Peng Xu, Davis Liang, Ajay Mishra, Bing Xiang, 2020, "TRANS-BLSTM: Transformer
with Bidirectional LSTM for Language Understanding", arXiv:2003.07000.

The blocks are post-norm BERT blocks (Devlin et al., 2019) changed as in the paper's Figure 2:

* **TRANS-BLSTM-1** (``variant=1``): the BLSTM *replaces* the feed-forward layer::

      h = LayerNorm(x + Attention(x))
      y = LayerNorm(h + BLSTM(h))

  so the block has no feed-forward module at all.

* **TRANS-BLSTM-2** (``variant=2``): the block keeps its feed-forward layer and a BLSTM runs in
  *parallel* to the whole block on the block's input; its output is summed with the
  attention + feed-forward path before the block's last LayerNorm::

      h = LayerNorm(x + Attention(x))
      y = LayerNorm(h + FeedForward(h) + BLSTM(x))

In both, the BLSTM has ``dim // 2`` units per direction, so its concatenated output has the
block width and needs no projection. Here the tokens are day patches of the activity series
(:class:`~fusion.models.series_patch.SeriesPatchEmbed`) with sinusoidal positions, not words.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from fusion.models.bilstm import BiLSTM
from fusion.models.blocks import FeedForward, MaskedAttention, masked_mean
from fusion.models.series_patch import SeriesEncoding, SeriesPatchEmbed, sinusoidal_positions


class TransBLSTMBlock(nn.Module):
    """One TRANS-BLSTM block (post-norm), ``(B, N, D) -> (B, N, D)``.

    Args:
        dim: token width D; even (the BLSTM has ``dim // 2`` units per direction).
        heads: attention heads.
        variant: 1 = BLSTM instead of the feed-forward layer; 2 = feed-forward layer kept and a
            BLSTM on the block input added before the last LayerNorm (see the module docstring).
        mlp_ratio: feed-forward inner width over ``dim`` (variant 2 only; variant 1 has none).
        dropout: dropout on attention weights and on each sublayer's output (the shared
            attention and feed-forward modules of :mod:`fusion.models.blocks` drop their own
            outputs; ``self.drop`` serves the BLSTM).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        variant: Literal[1, 2],
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if variant not in (1, 2):
            raise ValueError(f"TRANS-BLSTM variant must be 1 or 2, got {variant!r}")
        self.variant = variant
        self.attn = MaskedAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.lstm = BiLSTM(dim, dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), dropout) if variant == 2 else None
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x (B, N, D)`` -> ``(B, N, D)``; ``mask (B, N)`` True = token may be attended to."""
        h = self.norm1(x + self.attn(x, x, mask))
        if self.mlp is None:
            return self.norm2(h + self.drop(self.lstm(h)))
        return self.norm2(h + self.mlp(h) + self.drop(self.lstm(x)))


class TransBLSTMEncoder(nn.Module):
    """Series encoder: day patches + sinusoidal positions -> TRANS-BLSTM blocks -> masked mean.

    Args:
        in_features: F, values per hour in the input series.
        dim: D, the token width.
        depth: number of blocks.
        heads: attention heads per block.
        variant: TRANS-BLSTM variant (1 or 2) used by every block.
        patch_hours: hours per token.
        dropout: dropout on the embedded tokens and inside the blocks.
    """

    def __init__(
        self,
        in_features: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        variant: Literal[1, 2] = 1,
        patch_hours: int = 24,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.out_dim = dim
        self.embed = SeriesPatchEmbed(in_features, dim, patch_hours)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransBLSTMBlock(dim, heads, variant, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, series: Tensor, mask: Tensor) -> SeriesEncoding:
        """Encode ``series (B, T, F)`` with presence ``mask (B, T)``.

        Returns:
            :class:`SeriesEncoding` with ``tokens (B, N, D)``, ``mask (B, N)`` and
            ``pooled (B, D)``, the mean over patches with at least one present hour; patches
            with no present hour are never attended to.
        """
        tokens, token_mask = self.embed(series, mask)
        positions = sinusoidal_positions(
            tokens.shape[1], tokens.shape[2], device=tokens.device, dtype=tokens.dtype
        )
        x = self.drop(tokens + positions)
        for block in self.blocks:
            x = block(x, token_mask)
        x = self.norm(x)
        return SeriesEncoding(x, token_mask, masked_mean(x, token_mask))
