"""Shared transformer building blocks for the fusion modules.

Pre-norm blocks in the style of timm's ``vision_transformer.py``. Masks follow the project
convention: a bool tensor of shape ``(B, N)`` with ``True`` marking a valid token.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the valid tokens of each sample.

    Args:
        x: tokens, ``(B, N, D)``.
        mask: ``(B, N)`` bool, ``True`` = valid; ``None`` means all tokens are valid.

    Returns:
        ``(B, D)``; a sample with no valid token gets zeros.
    """
    if mask is None:
        return x.mean(dim=1)
    weights = mask.unsqueeze(-1).to(x.dtype)
    total = (x * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return total / count


class FeedForward(nn.Module):
    """Position-wise MLP: ``Linear -> GELU -> Dropout -> Linear -> Dropout``; ``(B, N, dim)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MaskedAttention(nn.Module):
    """Multi-head attention from a query sequence to a memory sequence with a validity mask.

    A query row whose memory has no valid token gets a zero output (instead of the NaN a
    softmax over only masked keys can give), so the residual stream passes it through.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, memory: Tensor, memory_mask: Tensor | None = None) -> Tensor:
        """Attend.

        Args:
            query: ``(B, N_q, dim)``.
            memory: keys and values, ``(B, N_m, dim)``.
            memory_mask: ``(B, N_m)`` bool, ``True`` = valid key; ``None`` = all valid.

        Returns:
            ``(B, N_q, dim)``.
        """
        batch, n_query, dim = query.shape
        head_dim = dim // self.heads
        q = self.q(query).reshape(batch, n_query, self.heads, head_dim).transpose(1, 2)
        k, v = (
            self.kv(memory)
            .reshape(batch, memory.shape[1], 2, self.heads, head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        keys = None
        if memory_mask is not None:
            empty = ~memory_mask.any(dim=1)
            # SDPA's result for a row with no valid key is undocumented (NaN in some backends):
            # let such a row attend over all keys, then zero its output below.
            keys = (memory_mask | empty.unsqueeze(1))[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keys, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.proj(out.transpose(1, 2).reshape(batch, n_query, dim))
        if memory_mask is not None:
            out = out.masked_fill(empty.view(-1, 1, 1), 0.0)
        return self.proj_drop(out)


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + SA(LN x)``, then ``x + FFN(LN x)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Update ``x`` ``(B, N, dim)``; ``mask`` ``(B, N)`` bool, ``True`` = valid key."""
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ffn(self.norm2(x))
