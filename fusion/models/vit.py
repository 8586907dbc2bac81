"""Image branch: a pretrained timm Vision Transformer returning patch tokens and a pooled vector.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT); the default backbone is DINOv2
ViT-S/14 (Oquab et al. 2023) as ``vit_small_patch14_dinov2``. timm adapts the patch embedding to
band counts other than 3 and resamples the position embeddings to the tile size at load time.
Weights come from a local file (``weights=PATH``, nothing is downloaded), from the Hugging Face hub
(``weights="hub"``, for users who are online), or nowhere (``weights=None``, random init).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn
from torch.nn import functional as F

from fusion.models.tome import merged_tokens

VIT_NAME = "vit_small_patch14_dinov2"  # the default backbone: DINOv2 ViT-S/14
Freeze = Literal["all", "none"] | int
# Parameters after the last block (trained with the full rate and not frozen by ``freeze=k``).
_HEAD_PREFIXES = ("norm.", "fc_norm.", "head")


def cls_and_mean(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens (B, 1 + N, D)`` (CLS first) → the CLS and mean patch token side by side
    ``(B, 2D)``: the image vector of the image expert and of the linear probe."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


class ViTEncoder(nn.Module):
    """``(B, C, S, S)`` → ``tokens (B, 1 + G*G, D)`` (CLS + pooled patch grid), ``pooled (B, D)``.

    Args:
        name: timm model name (any ViT with ``forward_features`` returning prefix + patch tokens).
        weights: local weights file, ``"hub"``, or ``None`` for random init.
        in_chans: band count of the input tiles.
        img_size: tile side in pixels (a multiple of the patch size).
        freeze: ``"all"`` (frozen backbone), ``"none"`` (fully trained) or ``k`` (patch embedding
            and the first ``k`` blocks frozen; the last ``L - k`` blocks train).
        token_grid: average-pool the patch tokens to a ``G x G`` grid (``None`` keeps all of them);
            fewer tokens make fusion cheaper and frozen tokens small enough to cache. With
            ``freeze=k`` the pooling comes after block ``k``, so the trained blocks read the
            ``1 + G*G`` pooled tokens: partial fine-tuning a CPU can afford.

    The frozen part (:meth:`frozen_part`) is what a task may compute once per tile and cache;
    :meth:`trainable_part` finishes the encoding from it.
    """

    def __init__(
        self,
        name: str = VIT_NAME,
        weights: str | None = "hub",
        in_chans: int = 3,
        img_size: int = 224,
        freeze: Freeze = "all",
        token_grid: int | None = 4,
    ) -> None:
        super().__init__()
        overlay = None
        if weights not in (None, "hub"):
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"ViT weights file not found: {path}")
            overlay = {"file": str(path)}
        self.backbone = timm.create_model(
            name,
            pretrained=weights is not None,
            num_classes=0,
            in_chans=in_chans,
            img_size=img_size,
            pretrained_cfg_overlay=overlay,
        )
        self.weights = weights
        self.config: dict[str, object] = {
            "name": name, "in_chans": in_chans, "img_size": img_size, "token_grid": token_grid,
        }  # fmt: skip
        if isinstance(freeze, int):
            self.config["frozen_blocks"] = freeze  # where the cached tokens are taken
        self.out_dim: int = self.backbone.embed_dim
        self.num_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        self.grid = tuple(self.backbone.patch_embed.grid_size)
        self.token_grid = token_grid
        self.freeze = freeze
        # Tokens merged per frozen block at inference (ToMe, fusion.models.tome; 0 = off): an
        # option of prediction, not of the trained model, so never saved.
        self.merge = 0
        self._apply_freeze()

    @property
    def frozen(self) -> bool:
        return self.freeze == "all"

    @property
    def cacheable(self) -> bool:
        """Whether a frozen part exists whose output can be cached (not ``freeze="none"``)."""
        return self.freeze != "none"

    @property
    def num_tokens(self) -> int:
        patches = self.token_grid**2 if self.token_grid else self.grid[0] * self.grid[1]
        return 1 + patches

    def _apply_freeze(self) -> None:
        if self.freeze == "none":
            return
        frozen_blocks = len(self.backbone.blocks) if self.freeze == "all" else int(self.freeze)
        if not 0 <= frozen_blocks <= len(self.backbone.blocks):
            raise ValueError(
                f"freeze must be 'all', 'none' or 0..{len(self.backbone.blocks)}, got {self.freeze}"
            )
        for name, param in self.backbone.named_parameters():
            block = _block_index(name)
            if block is None:
                # Embeddings are frozen with any frozen block; the final norm only with "all".
                freeze = self.freeze == "all" or not name.startswith(_HEAD_PREFIXES)
            else:
                freeze = block < frozen_blocks
            param.requires_grad_(not freeze)

    def train(self, mode: bool = True) -> ViTEncoder:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone keeps dropout/stochastic depth off
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, S, S)`` → ``tokens (B, 1 + G*G, D)``, ``pooled (B, D)`` (the CLS token)."""
        if not self.cacheable:
            return self.pool_tokens(self.backbone.forward_features(images))
        tokens = self.trainable_part(self.frozen_part(images))
        return tokens, tokens[:, 0]

    @torch.no_grad()
    def frozen_part(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` → the frozen blocks' output ``(B, 1 + G*G, D)``: the final tokens
        (``freeze="all"``) or those after block ``k`` (``freeze=k``), pooled to the grid."""
        return self.pool_tokens(self.backbone_tokens(images))[0]

    def backbone_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` → the backbone's tokens where they are pooled to the grid, ``(B, P +
        H*W, D)`` (``P`` prefix tokens, an ``H x W`` patch grid): after block ``k``
        (``freeze=k``), else the final ones. What :meth:`pool_tokens` reads; a saliency map
        differentiates through it from here on. With ``merge`` (ToMe), the merged tokens given
        back on the full grid."""
        backbone = self.backbone
        if self.merge and self.freeze != "none":
            blocks = len(backbone.blocks) if self.freeze == "all" else int(self.freeze)
            return merged_tokens(backbone, images, self.merge, blocks)
        if self.freeze in ("all", "none"):
            return backbone.forward_features(images)
        x = backbone.norm_pre(
            backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images)))
        )
        for block in backbone.blocks[: int(self.freeze)]:
            x = block(x)
        return x

    def trainable_part(self, tokens: torch.Tensor) -> torch.Tensor:
        """Finish the encoding from :meth:`frozen_part`'s ``tokens (B, N, D)``: the trained
        blocks and the final norm (nothing when the whole backbone is frozen)."""
        if self.frozen:
            return tokens
        for block in self.backbone.blocks[int(self.freeze) :]:
            tokens = block(tokens)
        return self.backbone.norm(tokens)

    def pool_tokens(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone output ``(B, P + H*W, D)`` → CLS + pooled grid tokens, and the CLS vector."""
        cls = feats[:, :1]
        patches = feats[:, self.num_prefix :]
        if self.token_grid:
            b, _, d = patches.shape
            grid = patches.transpose(1, 2).reshape(b, d, *self.grid)
            patches = F.adaptive_avg_pool2d(grid, self.token_grid).flatten(2).transpose(1, 2)
        return torch.cat([cls, patches], dim=1), cls[:, 0]

    def param_groups(self, lr: float, layer_decay: float = 1.0) -> list[dict]:
        """Trainable backbone parameters with layer-wise learning-rate decay.

        Block ``i`` of ``L`` gets ``lr * layer_decay ** (L - i)``; embeddings get the smallest rate,
        the final norm the full rate.
        """
        depth = len(self.backbone.blocks)
        groups: dict[int, list[nn.Parameter]] = {}
        for name, param in self.backbone.named_parameters():
            if not param.requires_grad:
                continue
            block = _block_index(name)
            if block is not None:
                layer = block + 1
            else:  # the final norm (not ``norm_pre``, which acts on the embeddings) gets full lr
                layer = depth + 1 if name.startswith(_HEAD_PREFIXES) else 0
            groups.setdefault(layer, []).append(param)
        return [
            {"params": params, "lr": lr * layer_decay ** (depth + 1 - k), "name": f"vit.{k}"}
            for k, params in sorted(groups.items())
        ]


def _block_index(param_name: str) -> int | None:
    """``blocks.7.attn.qkv.weight`` → 7; parameters outside the blocks → None."""
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1])
    return None
