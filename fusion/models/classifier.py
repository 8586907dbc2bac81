"""The fusion classifier: image branch + series branch + a fusion module + a linear head.

Variants (``fusion``):

- ``none``: one branch only (``image`` or ``series`` must be switched off): the ViT image-only
  model or the BiLSTM / TRANS-BLSTM series-only baseline.
- ``concat``: late fusion, pooled image and series vectors concatenated.
- ``msift``: MsIFT-style cross-attention decoders (:mod:`fusion.models.msift`).
- ``mbt``: MBT bottleneck fusion from ``fusion_layer`` on (:mod:`fusion.models.mbt`).

A missing view (``has_image`` / ``has_series`` False, or dropped by modality dropout while
training) is replaced by a learned token, never by zeros that could pass for data.

With ``experts`` (fused variants), an image expert and a series expert sit beside the fusion
module, and the output pools the three heads as a weighted product of experts
(:mod:`fusion.models.experts`); the weights (``view_weights``) are fitted on held-out places by
the task. The image branch's pooled vector is its CLS token and its mean patch token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fusion.models.bilstm import BiLSTMEncoder
from fusion.models.blocks import masked_mean
from fusion.models.experts import ExpertHead, pool_experts
from fusion.models.mbt import BottleneckFusion, fusion_layer_for
from fusion.models.msift import MsIFTFusion
from fusion.models.trans_blstm import TransBLSTMEncoder
from fusion.models.vit import VIT_NAME, Freeze, ViTEncoder, cls_and_mean

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


@dataclass(frozen=True)
class NetConfig:
    """The network settings of a :class:`FusionClassifier` (every keyword argument but the
    data facts ``num_classes``, ``in_chans``, ``n_features``, ``n_counts`` and ``img_size``).

    Args:
        image: use the image branch.
        series: use the series branch.
        fusion: ``none`` (one branch), ``concat``, ``msift`` or ``mbt`` (module docstring).
        vit_name: timm name of the image backbone.
        vit_weights: local weights file of the backbone, ``hub``, or null for random init.
        freeze: ``all`` (frozen ViT), ``none`` (trained) or k (the first k blocks frozen).
        token_grid: pool the patch tokens to a G x G grid (null keeps them all).
        series_encoder: ``bilstm`` or ``trans_blstm``.
        series_dim: width of the series encoder.
        series_depth: LSTM layers, or transformer blocks of the TRANS-BLSTM.
        trans_blstm_variant: TRANS-BLSTM variant (1 or 2, Huang et al. 2020).
        patch_hours: hours per series token.
        fusion_dim: width of the fusion module.
        fusion_depth: layers of the fusion module.
        fusion_heads: attention heads of the fusion module (and of the TRANS-BLSTM).
        fusion_layer: MBT's first fused layer, or ``early`` / ``mid`` / ``late``.
        n_bottlenecks: MBT bottleneck tokens.
        dropout: dropout inside the new layers and before the heads.
        experts: with a fusion module, add an image expert and a series expert head.
        isolate_series: the series encoder learns from the series expert alone.

    ``isolate_series``: the fusion reads the series tokens without sending gradients back, so
    fitting the training places through the fusion cannot make the series features memorise
    those places. ``vit_name``, ``vit_weights``, ``freeze``, ``token_grid``: see
    :class:`~fusion.models.vit.ViTEncoder`.
    """

    image: bool = True
    series: bool = True
    fusion: FusionKind = "mbt"
    vit_name: str = VIT_NAME
    vit_weights: str | None = "hub"
    freeze: Freeze = "all"
    token_grid: int | None = 4
    series_encoder: SeriesKind = "bilstm"
    series_dim: int = 128
    series_depth: int = 2
    trans_blstm_variant: Literal[1, 2] = 1
    patch_hours: int = 24
    fusion_dim: int = 128
    fusion_depth: int = 4
    fusion_heads: int = 4
    fusion_layer: int | Literal["early", "mid", "late"] = "mid"
    n_bottlenecks: int = 4
    dropout: float = 0.1
    experts: bool = False
    isolate_series: bool = False

    @classmethod
    def of(cls, net: NetConfig | Mapping[str, Any] | None) -> NetConfig:
        """``net`` as a config: a config as is, a mapping of its fields (a checkpoint's saved
        settings; unknown keys are an error), or ``None`` for the defaults."""
        if net is None:
            return cls()
        return net if isinstance(net, NetConfig) else cls(**net)


class FusionClassifier(nn.Module):
    """``image (B, C, S, S)`` + ``series (B, T, F)`` → logits ``(B, K)``.

    Args:
        num_classes: K.
        in_chans: image bands.
        n_features: F, values per hour (count channels + 4 calendar features).
        n_counts: how many of the F channels are counts (standardised per window).
        img_size: tile side in pixels.

        net: the network settings (:class:`NetConfig`, documented there); ``settings``
            override single fields (``FusionClassifier(6, fusion="concat")``).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        n_features: int = 5,
        n_counts: int = 1,
        img_size: int = 224,
        net: NetConfig | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        net = replace(NetConfig.of(net), **settings)
        if not (net.image or net.series):
            raise ValueError("at least one of image and series must be used")
        if net.fusion == "none" and net.image and net.series:
            raise ValueError("fusion='none' needs a single branch: switch image or series off")
        if net.fusion != "none" and not (net.image and net.series):
            raise ValueError(f"fusion='{net.fusion}' needs both branches")
        self.n_counts = n_counts
        self.fusion_kind = net.fusion
        self.isolate_series = net.isolate_series
        self.image_encoder = (
            ViTEncoder(
                net.vit_name, net.vit_weights, in_chans, img_size, net.freeze, net.token_grid
            )
            if net.image
            else None
        )
        self.series_encoder: BiLSTMEncoder | TransBLSTMEncoder | None = None
        if net.series and net.series_encoder == "bilstm":
            self.series_encoder = BiLSTMEncoder(
                n_features, net.series_dim, net.series_depth, net.dropout, net.patch_hours
            )
        elif net.series:
            self.series_encoder = TransBLSTMEncoder(
                n_features, net.series_dim, net.series_depth, net.fusion_heads,
                net.trans_blstm_variant, net.patch_hours, net.dropout,
            )  # fmt: skip
        image_dim = self.image_encoder.out_dim if self.image_encoder else 0
        self.missing_image = MissingToken(image_dim) if net.image and net.series else None
        self.missing_series = MissingToken(net.series_dim) if net.image and net.series else None
        self.fusion: MsIFTFusion | BottleneckFusion | None = None
        if net.fusion == "msift":
            self.fusion = MsIFTFusion(
                image_dim,
                net.series_dim,
                net.fusion_dim,
                net.fusion_depth,
                net.fusion_heads,
                dropout=net.dropout,
            )
        elif net.fusion == "mbt":
            layer = (
                fusion_layer_for(net.fusion_layer, net.fusion_depth)
                if isinstance(net.fusion_layer, str)
                else net.fusion_layer
            )
            self.fusion = BottleneckFusion(
                image_dim, net.series_dim, net.fusion_dim, net.fusion_depth, layer,
                net.n_bottlenecks, net.fusion_heads, dropout=net.dropout,
            )  # fmt: skip
        image_vector = 2 * image_dim  # CLS and mean patch token
        if self.fusion is not None:
            out_dim = self.fusion.out_dim
        else:
            out_dim = (image_vector if net.image else 0) + (net.series_dim if net.series else 0)
        self.head = ExpertHead(out_dim, num_classes, net.dropout)
        self.image_expert = self.series_expert = None
        if net.experts and net.fusion != "none":
            self.image_expert = ExpertHead(image_vector, num_classes, net.dropout)
            self.series_expert = ExpertHead(net.series_dim, num_classes, net.dropout)
        # The weight of each head in the output (fitted on held-out places by the task).
        self.register_buffer("view_weights", torch.ones(len(self.head_names)))

    @property
    def head_names(self) -> tuple[str, ...]:
        """The heads pooled into the output, in the order of ``view_weights``."""
        if self.fusion_kind == "none":
            return ("image",) if self.image_encoder is not None else ("series",)
        return ("fused", "image", "series") if self.image_expert is not None else ("fused",)

    def head_modules(self) -> list[nn.Module]:
        """The classification heads (the output head and the experts)."""
        return [h for h in (self.head, self.image_expert, self.series_expert) if h is not None]

    def series_modules(self) -> list[nn.Module]:
        """The modules that read the series alone (its encoder and its expert)."""
        return [m for m in (self.series_encoder, self.series_expert) if m is not None]

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, C, S, S)`` → image tokens ``(B, 1 + G*G, D)`` (CLS first).

        A frozen part's tokens are rounded to float16, as they are when cached per tile, so a
        model gives the same outputs whether they come from a cache (fit, test) or are computed
        on the spot (predict)."""
        encoder = self.image_encoder
        assert encoder is not None
        if not encoder.cacheable:
            return encoder(images)[0]
        return encoder.trainable_part(encoder.frozen_part(images).half().float())

    def forward(
        self,
        image: Tensor | None = None,
        series: Tensor | None = None,
        series_mask: Tensor | None = None,
        has_image: Tensor | None = None,
        has_series: Tensor | None = None,
        image_tokens: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, K)``: the heads of :meth:`heads` pooled with ``view_weights``."""
        heads = self.heads(image, series, series_mask, has_image, has_series, image_tokens)
        return pool_experts(heads, self.view_weights)

    def heads(
        self,
        image: Tensor | None = None,
        series: Tensor | None = None,
        series_mask: Tensor | None = None,
        has_image: Tensor | None = None,
        has_series: Tensor | None = None,
        image_tokens: Tensor | None = None,
        hide_image: Tensor | None = None,
        hide_series: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Logits ``(B, K)`` of each head in :attr:`head_names`; an expert's logits are zero
        for samples without its view.

        Args:
            image: ``(B, C, S, S)``; not needed when ``image_tokens`` (precomputed, e.g. by a
                frozen ViT) are given.
            series: ``(B, T, F)``; ``series_mask``: ``(B, T)`` bool, True = hour present.
            has_image / has_series: ``(B,)`` bool, False = that view is missing for the sample.
            image_tokens: ``(B, N, D)`` output of :meth:`encode_image`.
            hide_image / hide_series: ``(B,)`` bool, True = hide that view from the fusion only
                (modality dropout while training); the experts still read it.
        """
        for_fusion = {
            "image": _hidden(has_image, hide_image),
            "series": _hidden(has_series, hide_series),
        }
        parts: list[Tensor] = []
        img_tokens = ser_tokens = ser_token_mask = None
        image_vector = series_vector = None
        if self.image_encoder is not None:
            img_tokens = image_tokens if image_tokens is not None else self.encode_image(image)
            image_vector = cls_and_mean(img_tokens)
            if self.missing_image is not None and for_fusion["image"] is not None:
                img_tokens = self.missing_image(img_tokens, for_fusion["image"])
            parts.append(cls_and_mean(img_tokens))
        if self.series_encoder is not None:
            assert series is not None and series_mask is not None
            series = standardize_counts(series, series_mask, self.n_counts)
            encoding = self.series_encoder(series, series_mask)
            ser_tokens, ser_token_mask = encoding.tokens, encoding.mask
            series_vector = encoding.pooled
            if self.isolate_series and self.series_expert is not None:
                ser_tokens = ser_tokens.detach()
            if self.missing_series is not None and for_fusion["series"] is not None:
                ser_tokens = self.missing_series(ser_tokens, for_fusion["series"])
                ser_token_mask = ser_token_mask | ~for_fusion["series"][:, None]
            parts.append(masked_mean(ser_tokens, ser_token_mask))
        if self.fusion is not None:
            features = self.fusion(img_tokens, ser_tokens, None, ser_token_mask)
        else:
            features = torch.cat(parts, dim=-1)
        out = {self.head_names[0]: self.head(features)}
        if self.image_expert is not None and self.series_expert is not None:
            assert image_vector is not None and series_vector is not None
            out["image"] = _where_present(self.image_expert(image_vector), has_image)
            out["series"] = _where_present(self.series_expert(series_vector), has_series)
        return out


def _hidden(present: Tensor | None, hide: Tensor | None) -> Tensor | None:
    """``present (B,)`` with the ``hide (B,)`` samples marked absent (either may be None)."""
    if hide is None:
        return present
    return ~hide if present is None else present & ~hide


def _where_present(logits: Tensor, present: Tensor | None) -> Tensor:
    """``logits (B, K)`` with the rows of absent samples (``present (B,)`` False) set to 0."""
    if present is None:
        return logits
    return torch.where(present[:, None], logits, torch.zeros((), dtype=logits.dtype))
