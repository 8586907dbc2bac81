"""What every benchmark measures: its settings, the model variants and a synthetic batch.

The variants are the configs' networks (frozen ViT, ``freeze="all"``, patch tokens pooled to a
4 x 4 grid) beside the bare timm ViT, the floor every ratio is to (:data:`TIMM_VIT`).

Models are built on the meta device and materialised (:func:`build_model`), the pretrained
backbone copied in from one load of the weights file: the same weights as the usual construction,
without timm's slow random initialisation of a backbone about to be overwritten.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from fusion.configs import CHECKOUT_CONFIGS, config_files, net_config, variant_names
from fusion.data.series import feature_count
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.models.vit import VIT_NAME

TIMM_VIT = "timm_vit"  # the bare timm backbone: the floor of every ratio
NUM_CLASSES = 8
N_COUNTS = 1
N_FEATURES = feature_count(["count"])  # one count channel + the calendar features
TARGET_RATIO = 0.85  # fusion inference throughput over the bare ViT's
SERIES_ENCODERS = ("bilstm", "trans_blstm")

# The bench's rows, each a variant of the configs (configs/base.yaml + configs/variants/NAME.yaml):
# the single-view models, then each fusion with the BiLSTM and with TRANS-BLSTM (its own config,
# NAME_trans_blstm, where there is one; else NAME's settings with this series encoder).
SINGLE_VIEW = ("vit", "bilstm")
FUSIONS = ("concat", "msift", "mbt_early", "mbt_mid", "mbt_late")
TRANS_BLSTM: dict[str, Any] = {"series_encoder": "trans_blstm", "trans_blstm_variant": 1}


def default_weights() -> str | None:
    """The shared DINOv2 ViT-S/14 weights file (``$FUSION_SHARED`` or ``../shared`` beside the
    checkout), or ``None`` (random init) when it is not there. Nothing is downloaded."""
    shared = Path(os.environ.get("FUSION_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    path = shared / "weights" / "dinov2_vits14_imgfocus.safetensors"
    return str(path) if path.is_file() else None


@dataclass
class BenchSettings:
    """What every measurement shares.

    Attributes:
        batch_size: samples per timed call.
        image_size: tile side in pixels (a multiple of the ViT's 14-pixel patch).
        hours: series length (a multiple of the 24-hour patch).
        repeats: timed calls per row; the median is reported.
        warmup: untimed calls per row before the timed ones.
        weights: ViT weights file, or ``None`` for random init (the cost is the same).
        device: ``cpu`` or a CUDA device.
        curve_repeats: timed calls per point of the scaling curves (after one untimed call).
        memory: measure peak memory (one child process per row); ``False`` leaves it NaN.
        threads: torch intra-op threads while measuring; ``None`` keeps torch's setting (one
            per core). One by default: the ratios, not the absolute speed, are the point, and on
            a machine shared with other busy processes more threads wait on each other at every
            operator, which made calls several times slower and the ratios noise.
    """

    batch_size: int = 8
    image_size: int = 224
    hours: int = 672
    repeats: int = 5
    warmup: int = 2
    weights: str | None = field(default_factory=default_weights)
    device: str = "cpu"
    curve_repeats: int = 3
    memory: bool = True
    threads: int | None = 1


def quick_settings(settings: BenchSettings) -> BenchSettings:
    """Tiny settings for tests: batch 2, 56 px tiles, one week, two warm-up calls (the first
    calls of an LSTM are slow), one timed call, one thread (tiny operators gain nothing from more).
    """
    return replace(
        settings, batch_size=2, image_size=56, hours=168, repeats=1, warmup=2, curve_repeats=1,
        threads=1,
    )  # fmt: skip


@functools.cache
def variants() -> dict[str, dict[str, Any]]:
    """Variant name → :class:`FusionClassifier` keyword arguments (all but ``vit_weights`` and
    ``img_size``, which come from :class:`BenchSettings`), read once from the checkout's configs
    (``model.net``, :func:`fusion.configs.net_config`): the bench measures the networks the
    configs train.

    ``vit`` (image only), ``bilstm`` (series only), then each fusion variant with the BiLSTM
    (``mbt_mid``) and with TRANS-BLSTM (``mbt_mid+trans_blstm``). The bare timm ViT,
    :data:`TIMM_VIT`, is not a :class:`FusionClassifier` and is not listed here.
    """
    configs = set(variant_names(CHECKOUT_CONFIGS))

    def net(name: str) -> NetConfig:
        return net_config(config_files(name, CHECKOUT_CONFIGS))

    def kwargs(config: NetConfig) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(config).items() if k != "vit_weights"}
        return {**settings, "num_classes": NUM_CLASSES, "n_features": N_FEATURES,
                "n_counts": N_COUNTS}  # fmt: skip

    out = {name: kwargs(net(name)) for name in SINGLE_VIEW}
    for name in FUSIONS:
        config = net(name)
        out[name] = kwargs(config)
        trans = f"{name}_trans_blstm"
        out[f"{name}+trans_blstm"] = kwargs(
            net(trans) if trans in configs else replace(config, **TRANS_BLSTM)
        )
    return out


def timm_floor(image_size: int) -> nn.Module:
    """The bare timm ViT with an 8-class head, unloaded (see :func:`build_model`); backbone frozen,
    only ``head`` trainable."""
    model = timm.create_model(
        VIT_NAME, pretrained=False, num_classes=NUM_CLASSES, img_size=image_size
    )
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    return model.eval()


@functools.lru_cache(maxsize=2)
def backbone_state(weights: str, image_size: int) -> dict[str, Tensor]:
    """The pretrained backbone's tensors at ``image_size``, loaded once per process by timm itself
    (which resamples the position grid), as :class:`~fusion.models.vit.ViTEncoder` loads them."""
    model = timm.create_model(
        VIT_NAME,
        pretrained=True,
        num_classes=0,
        img_size=image_size,
        pretrained_cfg_overlay={"file": str(weights)},
    )
    return model.state_dict()


def materialise(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-device ``module`` on ``device`` and initialise it: every parameter from
    N(0, 0.02) (the classifier's own init of its learned tokens), then each submodule's
    ``reset_parameters`` (PyTorch's defaults for linear, norm and LSTM layers)."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
        for buffer in module.buffers():
            buffer.zero_()
        for sub in module.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
    return module


def build_model(name: str, settings: BenchSettings) -> nn.Module:
    """The model of variant ``name`` (:data:`TIMM_VIT` or a key of :func:`variants`), on the
    settings' device.

    Built on the meta device, :func:`materialise`-d, and the pretrained backbone
    (:func:`backbone_state`, when ``settings.weights``) copied in: the weights of the usual
    construction without timm's slow initialisation of a backbone about to be overwritten, nor a
    read of the weights file per model.
    """
    with torch.device("meta"):
        if name == TIMM_VIT:
            model = timm_floor(settings.image_size)
        else:
            kwargs = variants()[name]
            model = FusionClassifier(**kwargs, vit_weights=None, img_size=settings.image_size)
    model = materialise(model, settings.device)
    if name == TIMM_VIT:
        backbone = model
    else:
        backbone = model.image_encoder.backbone if model.image_encoder else None
    if backbone is not None and settings.weights:
        state = backbone_state(settings.weights, settings.image_size)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith("head.") for key in missing):
            raise RuntimeError(f"backbone weights do not fit {name}: {missing=} {unexpected=}")
    return model


# ---------------------------------------------------------------------------------- inputs


@dataclass
class Batch:
    """One synthetic batch of the benchmark's shapes (values realistic enough, content irrelevant).

    Attributes:
        image: ``(B, 3, S, S)``.
        series: ``(B, T, F)``: log1p counts then hour/weekday sin/cos, 0 at absent hours.
        series_mask: ``(B, T)`` bool, True = hour present (about 95 %).
        present: ``(B,)`` bool, both views present.
        labels: ``(B,)`` class indexes.
    """

    image: Tensor
    series: Tensor
    series_mask: Tensor
    present: Tensor
    labels: Tensor

    def head(self, n: int) -> Batch:
        """The first ``n`` samples."""
        return Batch(*(getattr(self, f.name)[:n] for f in fields(self)))


def make_batch(
    batch_size: int, image_size: int, hours: int, device: str = "cpu", seed: int = 0
) -> Batch:
    """A seeded synthetic :class:`Batch` of ``batch_size`` samples on ``device``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    rate = torch.full((batch_size, hours, N_COUNTS), 50.0)
    counts = torch.log1p(torch.poisson(rate, generator=g))
    hour = torch.arange(hours, dtype=torch.float32)
    day, week = 2 * math.pi * hour / 24, 2 * math.pi * hour / (24 * 7)
    calendar = torch.stack([day.sin(), day.cos(), week.sin(), week.cos()], dim=-1)
    mask = torch.rand(batch_size, hours, generator=g) > 0.05
    series = torch.cat([counts, calendar.expand(batch_size, -1, -1)], dim=-1)
    series = series * mask.unsqueeze(-1)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    present = torch.ones(batch_size, dtype=torch.bool)
    return Batch(*(t.to(device) for t in (image, series, mask, present, labels)))


def forward_fn(
    model: nn.Module, batch: Batch, image_tokens: Tensor | None = None
) -> Callable[[], Tensor]:
    """A call running ``model`` on ``batch`` (only the inputs its branches use) → logits
    ``(B, K)``; with ``image_tokens (B, N, D)`` a fusion model skips its ViT."""
    if not isinstance(model, FusionClassifier):
        return lambda: model(batch.image)
    kwargs: dict[str, Tensor] = {}
    if model.image_encoder is not None and image_tokens is not None:
        kwargs["image_tokens"] = image_tokens
    elif model.image_encoder is not None:
        kwargs["image"] = batch.image
    if model.series_encoder is not None:
        kwargs["series"], kwargs["series_mask"] = batch.series, batch.series_mask
    if model.image_encoder is not None and model.series_encoder is not None:
        kwargs["has_image"] = kwargs["has_series"] = batch.present
    return lambda: model(**kwargs)
