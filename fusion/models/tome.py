"""Token merging in a frozen ViT at inference (ToMe; Bolya et al. 2023, "Token Merging: Your ViT
But Faster", ICLR).

Between the attention and the MLP of each block, ``r`` patch tokens are merged into others by
*bipartite soft matching*: the tokens are split alternately into sets A and B, each A token is
matched to its most similar B token (cosine similarity of the attention keys, averaged over
heads), and the ``r`` best-matched A tokens are averaged into their B partners, weighted by how
many patches each already holds. Prefix tokens (CLS) are never merged. *Proportional
attention* adds ``log(size)`` to the attention logits of every key, so a token standing for
``s`` patches weighs as ``s`` tokens would. Nothing is trained: the timm blocks' own weights
run on fewer tokens (``r`` per block, at most half of the patch tokens left).

Every original patch remembers the token it was merged into, so the output is given back on
the full patch grid (each patch takes its token's features): what reads the grid (the pooled
``G x G`` tokens of :class:`~fusion.models.vit.ViTEncoder`) is unchanged. ``r = 0`` runs the
blocks untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _attention(attn: nn.Module, x: Tensor, log_size: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` on ``x (B, N, D)`` with proportional attention (``log_size (B, N)``
    added to every query's logits of each key): the output ``(B, N, D)`` and the keys averaged
    over heads ``(B, N, D / heads)``, the similarity ToMe matches with."""
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = log_size[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, d))
    return attn.proj(out), k.mean(dim=1)


def bipartite_merge(
    x: Tensor, metric: Tensor, size: Tensor, where: Tensor, r: int, prefix: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` of the patch tokens of ``x (B, N, D)`` (after ``prefix`` tokens, never
    merged) by bipartite soft matching on ``metric (B, N, E)``; ``size (B, N)`` counts the
    patches each token holds and ``where (B, P)`` the token each original patch is in.
    Returns ``x (B, N - r, D)``, ``size`` and ``where`` updated. Tokens are kept in the order:
    prefix, unmerged A tokens, B tokens."""
    patches = x.shape[1] - prefix
    r = min(r, patches // 2)
    if r <= 0:
        return x, size, where
    metric = F.normalize(metric[:, prefix:].float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, Na): each A token's B match
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # A indices
    n_a, n_b = a.shape[1], b.shape[1]
    batch = torch.arange(x.shape[0], device=x.device)[:, None]

    # Size-weighted sums: merged A tokens are added into their B partners.
    weight = size[:, prefix:, None].to(x.dtype)
    total = x[:, prefix:] * weight
    a_x, b_x = total[:, ::2], total[:, 1::2].clone()
    a_s, b_s = weight[:, ::2], weight[:, 1::2].clone()
    dst = partner.gather(1, merged)  # (B, r) B indices
    b_x.scatter_add_(1, dst[..., None].expand(-1, -1, x.shape[-1]), a_x[batch, merged])
    b_s.scatter_add_(1, dst[..., None], a_s[batch, merged])
    new_x = torch.cat([x[:, :prefix], a_x[batch, kept] / a_s[batch, kept], b_x / b_s], dim=1)
    new_size = torch.cat([size[:, :prefix], a_s[batch, kept, 0], b_s[..., 0]], dim=1)

    # Where each old token went: kept A tokens first, then B; merged A to its partner in B.
    to_a = torch.empty(x.shape[0], n_a, dtype=torch.long, device=x.device)
    to_a.scatter_(1, kept, prefix + torch.arange(n_a - r, device=x.device).expand_as(kept))
    to_a.scatter_(1, merged, prefix + n_a - r + dst)
    to_b = prefix + n_a - r + torch.arange(n_b, device=x.device).expand(x.shape[0], -1)
    old_to_new = torch.empty(x.shape[0], x.shape[1], dtype=torch.long, device=x.device)
    old_to_new[:, :prefix] = torch.arange(prefix, device=x.device)
    old_to_new[:, prefix::2], old_to_new[:, prefix + 1 :: 2] = to_a, to_b
    return new_x, new_size, old_to_new.gather(1, where)


def merged_block(
    block: nn.Module, x: Tensor, size: Tensor, where: Tensor, r: int, prefix: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One timm pre-norm ``Block`` (eval: no drop path) with proportional attention and ``r``
    tokens merged between its attention and its MLP."""
    out, keys = _attention(block.attn, block.norm1(x), size.log())
    x = x + block.ls1(out)
    x, size, where = bipartite_merge(x, keys, size, where, r, prefix)
    return x + block.ls2(block.mlp(block.norm2(x))), size, where


def check_mergeable(backbone: nn.Module) -> None:
    """Refuse a backbone whose blocks this implementation does not follow (timm ``Block`` with
    ``Attention``: fused qkv, no gate)."""
    for i, block in enumerate(backbone.blocks):
        attn = getattr(block, "attn", None)
        fields = ("qkv", "q_norm", "k_norm", "norm", "proj", "num_heads")
        if attn is None or not all(hasattr(attn, f) for f in fields) or getattr(attn, "gate", None):
            raise ValueError(
                f"token merging needs timm ViT blocks with fused-qkv attention; block {i} of "
                f"{type(backbone).__name__} is {type(block).__name__}"
            )


def merged_tokens(backbone: nn.Module, images: Tensor, r: int, blocks: int) -> Tensor:
    """``(B, C, S, S)`` → the tokens after the first ``blocks`` blocks of a timm ViT (after its
    final norm when all of them run), ``r`` tokens merged per block, given back on the full
    patch grid: ``(B, P + H*W, D)`` like ``forward_features``."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    n, patches = x.shape[0], x.shape[1] - prefix
    size = torch.ones(n, x.shape[1], device=x.device, dtype=x.dtype)
    where = (prefix + torch.arange(patches, device=x.device)).expand(n, -1)
    for block in backbone.blocks[:blocks]:
        x, size, where = merged_block(block, x, size, where, r, prefix)
    if blocks == len(backbone.blocks):
        x = backbone.norm(x)
    grid = x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], grid], dim=1)


def tokens_per_block(patches: int, r: int, blocks: int) -> list[int]:
    """The patch tokens each block's MLP reads with ``r`` merged per block (``patches`` at the
    start): what the merging saves, for the bench and the tests."""
    counts = []
    for _ in range(blocks):
        patches -= min(r, patches // 2)
        counts.append(patches)
    return counts
