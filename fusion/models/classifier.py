"""The fusion classifier: image branch + series branch + a fusion module + a linear head.

Variants (``fusion``):

- ``none``: one branch only (``image`` or ``series`` must be switched off): the ViT image-only
  model or the BiLSTM / TRANS-BLSTM series-only baseline.
- ``concat``: late fusion, pooled image and series vectors concatenated.
- ``msift``: MsIFT-style cross-attention decoders (:mod:`fusion.models.cross_attention`).
- ``mbt``: MBT bottleneck fusion from ``fusion_layer`` on (:mod:`fusion.models.bottleneck`).

A missing view (``has_image`` / ``has_series`` False, or dropped by modality dropout while
training) is replaced by a learned token, never by zeros that could pass for data.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fusion.models.bilstm import BiLSTMEncoder
from fusion.models.blocks import masked_mean
from fusion.models.bottleneck import BottleneckFusion, fusion_layer_for
from fusion.models.cross_attention import MsIFTFusion
from fusion.models.trans_blstm import TransBLSTMEncoder
from fusion.models.vit import Freeze, ViTEncoder

FusionKind = Literal["none", "concat", "msift", "mbt"]
SeriesKind = Literal["bilstm", "trans_blstm"]


def standardize_counts(series: Tensor, mask: Tensor, n_counts: int) -> Tensor:
    """Standardise the count channels of each window over its present hours.

    ``series (B, T, F)`` whose first ``n_counts`` channels are (log) counts; the rest (calendar
    features) pass through. Absolute level identifies a sensor more than a kind of place, so the
    model sees each window's rhythm and relative levels only. Absent hours stay 0.
    """
    counts = series[..., :n_counts]
    weight = mask.unsqueeze(-1).to(series.dtype)
    n = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (counts * weight).sum(dim=1, keepdim=True) / n
    var = ((counts - mean) ** 2 * weight).sum(dim=1, keepdim=True) / n
    scaled = (counts - mean) / (var.sqrt() + 1e-3) * weight
    return torch.cat([scaled, series[..., n_counts:]], dim=-1)


class MissingToken(nn.Module):
    """A learned stand-in for an absent view: ``(B, N, D)`` tokens → tokens with rows replaced."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, tokens: Tensor, present: Tensor) -> Tensor:
        return torch.where(present[:, None, None], tokens, self.token.to(tokens.dtype))


class FusionClassifier(nn.Module):
    """``image (B, C, S, S)`` + ``series (B, T, F)`` → logits ``(B, K)``.

    Args:
        num_classes: K.
        in_chans: image bands.
        n_features: F, values per hour (count channels + 4 calendar features).
        n_counts: how many of the F channels are counts (standardised per window).
        image / series: use this branch.
        fusion: see the module docstring.
        vit_name, vit_weights, img_size, freeze, token_grid: see :class:`ViTEncoder`.
        series_encoder: ``bilstm`` or ``trans_blstm``; ``series_dim``, ``series_depth`` (LSTM
            layers or transformer blocks), ``trans_blstm_variant`` (1 or 2), ``patch_hours``.
        fusion_dim, fusion_depth, fusion_heads: width, layers and heads of the fusion module.
        fusion_layer: MBT's first fused layer, or ``early`` / ``mid`` / ``late``.
        n_bottlenecks: MBT bottleneck tokens.
        dropout: dropout inside the new layers and before the head.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        n_features: int = 5,
        n_counts: int = 1,
        image: bool = True,
        series: bool = True,
        fusion: FusionKind = "mbt",
        vit_name: str = "vit_small_patch14_dinov2",
        vit_weights: str | None = "hub",
        img_size: int = 224,
        freeze: Freeze = "all",
        token_grid: int | None = 4,
        series_encoder: SeriesKind = "bilstm",
        series_dim: int = 128,
        series_depth: int = 2,
        trans_blstm_variant: Literal[1, 2] = 1,
        patch_hours: int = 24,
        fusion_dim: int = 128,
        fusion_depth: int = 4,
        fusion_heads: int = 4,
        fusion_layer: int | Literal["early", "mid", "late"] = "mid",
        n_bottlenecks: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not (image or series):
            raise ValueError("at least one of image and series must be used")
        if fusion == "none" and image and series:
            raise ValueError("fusion='none' needs a single branch: switch image or series off")
        if fusion != "none" and not (image and series):
            raise ValueError(f"fusion='{fusion}' needs both branches")
        self.n_counts = n_counts
        self.fusion_kind = fusion
        self.image_encoder = (
            ViTEncoder(vit_name, vit_weights, in_chans, img_size, freeze, token_grid)
            if image
            else None
        )
        self.series_encoder: BiLSTMEncoder | TransBLSTMEncoder | None = None
        if series and series_encoder == "bilstm":
            self.series_encoder = BiLSTMEncoder(
                n_features, series_dim, series_depth, dropout, patch_hours
            )
        elif series:
            self.series_encoder = TransBLSTMEncoder(
                n_features, series_dim, series_depth, fusion_heads, trans_blstm_variant,
                patch_hours, dropout,
            )  # fmt: skip
        image_dim = self.image_encoder.out_dim if self.image_encoder else 0
        self.missing_image = MissingToken(image_dim) if image and series else None
        self.missing_series = MissingToken(series_dim) if image and series else None
        self.fusion: MsIFTFusion | BottleneckFusion | None = None
        if fusion == "msift":
            self.fusion = MsIFTFusion(
                image_dim, series_dim, fusion_dim, fusion_depth, fusion_heads, dropout=dropout
            )
        elif fusion == "mbt":
            layer = (
                fusion_layer_for(fusion_layer, fusion_depth)
                if isinstance(fusion_layer, str)
                else fusion_layer
            )
            self.fusion = BottleneckFusion(
                image_dim, series_dim, fusion_dim, fusion_depth, layer, n_bottlenecks,
                fusion_heads, dropout=dropout,
            )  # fmt: skip
        out_dim = self.fusion.out_dim if self.fusion else image_dim + (series_dim if series else 0)
        self.head = nn.Sequential(
            nn.LayerNorm(out_dim), nn.Dropout(dropout), nn.Linear(out_dim, num_classes)
        )

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, C, S, S)`` → image tokens ``(B, 1 + G*G, D)`` (CLS first)."""
        assert self.image_encoder is not None
        return self.image_encoder(images)[0]

    def forward(
        self,
        image: Tensor | None = None,
        series: Tensor | None = None,
        series_mask: Tensor | None = None,
        has_image: Tensor | None = None,
        has_series: Tensor | None = None,
        image_tokens: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, K)``.

        Args:
            image: ``(B, C, S, S)``; not needed when ``image_tokens`` (precomputed, e.g. by a
                frozen ViT) are given.
            series: ``(B, T, F)``; ``series_mask``: ``(B, T)`` bool, True = hour present.
            has_image / has_series: ``(B,)`` bool, False = that view is missing for the sample.
            image_tokens: ``(B, N, D)`` output of :meth:`encode_image`.
        """
        parts: list[Tensor] = []
        img_tokens = ser_tokens = ser_token_mask = None
        if self.image_encoder is not None:
            img_tokens = image_tokens if image_tokens is not None else self.encode_image(image)
            if self.missing_image is not None and has_image is not None:
                img_tokens = self.missing_image(img_tokens, has_image)
            parts.append(img_tokens[:, 0])
        if self.series_encoder is not None:
            assert series is not None and series_mask is not None
            series = standardize_counts(series, series_mask, self.n_counts)
            encoding = self.series_encoder(series, series_mask)
            ser_tokens, ser_token_mask = encoding.tokens, encoding.mask
            if self.missing_series is not None and has_series is not None:
                ser_tokens = self.missing_series(ser_tokens, has_series)
                ser_token_mask = ser_token_mask | ~has_series[:, None]
            parts.append(masked_mean(ser_tokens, ser_token_mask))
        if self.fusion is not None:
            features = self.fusion(img_tokens, ser_tokens, None, ser_token_mask)
        else:
            features = torch.cat(parts, dim=-1)
        return self.head(features)
