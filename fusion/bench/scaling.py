"""Scaling curves: how inference time grows with series length, tile size and token counts.

Four curves, each written as ``scaling_<name>.png`` (and its numbers as ``scaling_<name>.csv``):

- ``series``: series length 168 … 8,760 hours (one week to one year) for the BiLSTM and the
  TRANS-BLSTM series encoders: the whole MBT-mid classifier given precomputed ViT tokens (series
  encoder, fusion, head), since the ViT's cost does not depend on the series; the bare ViT's
  forward at the benchmark's tile size is drawn for scale.
- ``tile``: tile size (multiples of the 14-pixel patch) for the bare timm ViT and MBT-mid, with
  MBT-mid's throughput as a ratio to the ViT's against the 0.85x target.
- ``bottlenecks``: MBT's number of bottleneck tokens, early and mid fusion (the fusion module
  alone: late fusion has no bottleneck).
- ``fusion_tokens``: MBT bottleneck fusion against MsIFT's full cross-attention as the number of
  tokens per modality grows (17, 65, 257, 1025: a 4 x 4, 8 x 8, 16 x 16 and 32 x 32 patch grid
  plus CLS), with their FLOPs: the fusion modules alone, on random token tensors.

Every point is the median of ``curve_repeats`` timed ``torch.inference_mode`` calls after one
untimed call (the process-wide first-call costs, such as oneDNN's LSTM set-up, are paid by the
model benchmark before), the points of a curve interleaved call by call. Models are randomly
initialised: the cost does not depend on the weights' values.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor, nn

from fusion.bench.build import (
    SERIES_ENCODERS,
    TARGET_RATIO,
    TIMM_VIT,
    BenchSettings,
    build_model,
    forward_fn,
    make_batch,
    materialise,
    variants,
)
from fusion.bench.timing import count_flops, median_times, torch_threads
from fusion.io import atomic_path
from fusion.models.classifier import FusionClassifier
from fusion.plots import save_figure

log = logging.getLogger(__name__)

SERIES_HOURS = (168, 336, 672, 1344, 2688, 4368, 8760)
TILE_SIZES = (112, 168, 224, 336)
BOTTLENECKS = (1, 2, 4, 8, 16, 32)
FUSION_TOKENS = (17, 65, 257, 1025)
CURVE_WARMUP = 1
QUICK = {"tile": (42, 56), "bottlenecks": (1, 4), "fusion_tokens": (17, 65)}
MBT_MID = {"bilstm": "mbt_mid", "trans_blstm": "mbt_mid+trans_blstm"}
ENCODER_LABELS = {"bilstm": "BiLSTM", "trans_blstm": "TRANS-BLSTM"}
# Fusion modules compared as tokens grow: (variant, fusion_depth override or None).
FUSION_MODULES = {
    "mbt_early": ("mbt_early", None),
    "mbt_mid": ("mbt_mid", None),
    "msift": ("msift", None),
    "msift_depth4": ("msift", 4),
}


def _inference(call: Callable[[], object]) -> Callable[[], None]:
    """``call`` wrapped in ``torch.inference_mode``."""

    def run() -> None:
        with torch.inference_mode():
            call()

    return run


def _fusion_module(settings: BenchSettings, variant: str, **overrides: Any) -> nn.Module:
    """The fusion module of ``variant`` exactly as :class:`FusionClassifier` builds it (its
    widths, heads and depth, with ``overrides``), alone, in eval mode."""
    with torch.device("meta"):
        net = FusionClassifier(**{**variants()[variant], **overrides}, vit_weights=None)
    assert net.fusion is not None
    return materialise(net.fusion, settings.device).eval()


def _tokens(
    settings: BenchSettings, module: nn.Module, n_image: int, n_series: int
) -> dict[str, Tensor]:
    """Random inputs of a fusion module: ``image_tokens (B, n_image, D_i)``, ``series_tokens
    (B, n_series, D_s)``, an all-valid ``series_mask (B, n_series)``."""
    b, device = settings.batch_size, settings.device
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, n_image, module.image_proj.in_features, generator=g)
    series = torch.randn(b, n_series, module.series_proj.in_features, generator=g)
    return {
        "image_tokens": image.to(device),
        "series_tokens": series.to(device),
        "series_mask": torch.ones(b, n_series, dtype=torch.bool, device=device),
    }


def series_curve(settings: BenchSettings, hours: Sequence[int] = SERIES_HOURS) -> pd.DataFrame:
    """Inference ms per batch of MBT-mid without its ViT (tokens precomputed) against series
    length, for each series encoder. Columns: series_encoder, hours, series_tokens, ms_per_batch."""
    random = replace(settings, weights=None)
    calls: dict[tuple[str, int], Callable[[], None]] = {}
    for encoder in SERIES_ENCODERS:
        model = build_model(MBT_MID[encoder], random).eval()
        vit = model.image_encoder
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(settings.batch_size, vit.num_tokens, vit.out_dim, generator=g)
        tokens = tokens.to(settings.device)
        for length in hours:
            batch = make_batch(settings.batch_size, 14, length, settings.device)
            calls[(encoder, length)] = _inference(forward_fn(model, batch, image_tokens=tokens))
    times = median_times(calls, settings.curve_repeats, CURVE_WARMUP, settings.device)
    patch = variants()["mbt_mid"].get("patch_hours", 24)
    return pd.DataFrame(
        [
            {"series_encoder": e, "hours": h, "series_tokens": h // patch, "ms_per_batch": t * 1e3}
            for (e, h), t in times.items()
        ]
    )


def tile_curve(settings: BenchSettings, sizes: Sequence[int] = TILE_SIZES) -> pd.DataFrame:
    """Full inference ms per batch of the bare timm ViT and of MBT-mid against tile size.

    Columns: model, tile, image_patches, ms_per_batch, samples_per_s, ratio (MBT-mid's throughput
    over the ViT's at that tile; 1 for the ViT)."""
    random = replace(settings, weights=None)
    calls: dict[tuple[str, int], Callable[[], None]] = {}
    for size in sizes:
        batch = make_batch(settings.batch_size, size, settings.hours, settings.device)
        tile_settings = replace(random, image_size=size)
        for name in (TIMM_VIT, "mbt_mid"):
            model = build_model(name, tile_settings).eval()
            calls[(name, size)] = _inference(forward_fn(model, batch))
    times = median_times(calls, settings.curve_repeats, CURVE_WARMUP, settings.device)
    frame = pd.DataFrame(
        [
            {
                "model": name,
                "tile": size,
                "image_patches": (size // 14) ** 2,
                "ms_per_batch": t * 1e3,
                "samples_per_s": settings.batch_size / t,
            }
            for (name, size), t in times.items()
        ]
    )
    floor = frame[frame["model"] == TIMM_VIT].set_index("tile")["samples_per_s"]
    frame["ratio"] = frame["samples_per_s"] / frame["tile"].map(floor)
    return frame


def bottleneck_curve(settings: BenchSettings, counts: Sequence[int] = BOTTLENECKS) -> pd.DataFrame:
    """Inference ms per batch of the MBT fusion module (early and mid) against the number of
    bottleneck tokens, on the benchmark's token counts (4 x 4 grid + CLS image tokens, one series
    token per day). Columns: fusion_layer, n_bottlenecks, ms_per_batch."""
    calls: dict[tuple[str, int], Callable[[], None]] = {}
    for variant in ("mbt_early", "mbt_mid"):
        for n in counts:
            module = _fusion_module(settings, variant, n_bottlenecks=n)
            inputs = _tokens(settings, module, 1 + 4 * 4, settings.hours // 24)
            calls[(variant.removeprefix("mbt_"), n)] = _inference(
                functools.partial(module, **inputs)
            )
    times = median_times(calls, settings.curve_repeats, CURVE_WARMUP, settings.device)
    return pd.DataFrame(
        [
            {"fusion_layer": layer, "n_bottlenecks": n, "ms_per_batch": t * 1e3}
            for (layer, n), t in times.items()
        ]
    )


def fusion_tokens_curve(
    settings: BenchSettings, tokens: Sequence[int] = FUSION_TOKENS
) -> pd.DataFrame:
    """Inference ms per batch and GFLOPs per sample of the MBT and MsIFT fusion modules against
    the number of tokens per modality (image and series alike).

    MBT early and mid (depth 4, 4 bottlenecks) and MsIFT as configured (depth 2) and at MBT's
    depth (``msift_depth4``). Columns: module, tokens, ms_per_batch, gflops_per_sample.
    """
    calls: dict[tuple[str, int], Callable[[], None]] = {}
    flops: dict[tuple[str, int], float] = {}
    for label, (variant, depth) in FUSION_MODULES.items():
        overrides = {} if depth is None else {"fusion_depth": depth}
        module = _fusion_module(settings, variant, **overrides)
        for n in tokens:
            forward = functools.partial(module, **_tokens(settings, module, n, n))
            calls[(label, n)] = _inference(forward)
            flops[(label, n)] = count_flops(module, forward) / settings.batch_size / 1e9
    times = median_times(calls, settings.curve_repeats, CURVE_WARMUP, settings.device)
    return pd.DataFrame(
        [
            {"module": label, "tokens": n, "ms_per_batch": t * 1e3,
             "gflops_per_sample": flops[(label, n)]}
            for (label, n), t in times.items()
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------------------- figures


def _log_axis(ax: plt.Axes, values: Sequence[int], axis: str = "x", base: int = 10) -> None:
    """Log scale on ``axis`` with a tick labelled at each of ``values``."""
    if axis == "x":
        ax.set_xscale("log", base=base)
        ax.set_xticks(list(values), [str(v) for v in values])
        ax.minorticks_off()
    else:
        ax.set_yscale("log", base=base)


def plot_series(frame: pd.DataFrame, settings: BenchSettings, vit_ms: float | None) -> plt.Figure:
    """Time per batch against series length, one line per series encoder."""
    fig, ax = plt.subplots(figsize=(7.0, 4.4), layout="constrained")
    for encoder, rows in frame.groupby("series_encoder", sort=False):
        ax.plot(
            rows["hours"],
            rows["ms_per_batch"],
            marker="o",
            label=f"MBT-mid + {ENCODER_LABELS.get(encoder, encoder)}",
        )
    if vit_ms is not None:
        ax.axhline(vit_ms, color="grey", ls="--",
                   label=f"bare ViT forward ({settings.image_size} px), for scale")  # fmt: skip
    _log_axis(ax, sorted(frame["hours"].unique()))
    ax.set_yscale("log")
    ax.set_xlabel("series length (hours)")
    ax.set_ylabel(f"inference time per batch of {settings.batch_size} (ms)")
    ax.set_title("Series branch + fusion + head (ViT tokens precomputed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def plot_tile(frame: pd.DataFrame, settings: BenchSettings) -> plt.Figure:
    """Time per batch against tile size (left) and MBT-mid's throughput ratio to the ViT (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2), layout="constrained")
    labels = {TIMM_VIT: "bare timm ViT", "mbt_mid": "MBT-mid + BiLSTM"}
    sizes = sorted(frame["tile"].unique())
    for name, rows in frame.groupby("model", sort=False):
        left.plot(rows["tile"], rows["ms_per_batch"], marker="o", label=labels.get(name, name))
    _log_axis(left, sizes)
    left.set_yscale("log")
    left.set_xlabel("tile size (pixels)")
    left.set_ylabel(f"inference time per batch of {settings.batch_size} (ms)")
    left.set_title("Inference time")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    mbt = frame[frame["model"] == "mbt_mid"]
    right.plot(mbt["tile"], mbt["ratio"], marker="o", color="C1", label="MBT-mid / bare ViT")
    right.axhline(TARGET_RATIO, color="grey", ls="--", label=f"target {TARGET_RATIO}x")
    _log_axis(right, sizes)
    right.set_ylim(0, max(1.1, float(mbt["ratio"].max()) * 1.05))
    right.set_xlabel("tile size (pixels)")
    right.set_ylabel("throughput ratio to the bare ViT")
    right.set_title("Fusion inference throughput / ViT's")
    right.grid(True, alpha=0.3)
    right.legend()
    return fig


def plot_bottlenecks(frame: pd.DataFrame, settings: BenchSettings) -> plt.Figure:
    """MBT fusion-module time against the number of bottleneck tokens."""
    fig, ax = plt.subplots(figsize=(7.0, 4.4), layout="constrained")
    for layer, rows in frame.groupby("fusion_layer", sort=False):
        ax.plot(rows["n_bottlenecks"], rows["ms_per_batch"], marker="o", label=f"MBT {layer}")
    _log_axis(ax, sorted(frame["n_bottlenecks"].unique()), base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("bottleneck tokens")
    ax.set_ylabel(f"fusion time per batch of {settings.batch_size} (ms)")
    ax.set_title(f"MBT fusion module, 17 image + {settings.hours // 24} series tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_fusion_tokens(frame: pd.DataFrame, settings: BenchSettings) -> plt.Figure:
    """Fusion-module time (left) and GFLOPs (right) against tokens per modality, MBT vs MsIFT."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.2), layout="constrained")
    labels = {
        "mbt_early": "MBT early (bottleneck, depth 4)",
        "mbt_mid": "MBT mid (bottleneck, depth 4)",
        "msift": "MsIFT (cross-attention, depth 2)",
        "msift_depth4": "MsIFT (cross-attention, depth 4)",
    }
    tokens = sorted(frame["tokens"].unique())
    for module, rows in frame.groupby("module", sort=False):
        label = labels.get(module, module)
        left.plot(rows["tokens"], rows["ms_per_batch"], marker="o", label=label)
        right.plot(rows["tokens"], rows["gflops_per_sample"], marker="o", label=label)
    for ax, ylabel in (
        (left, f"fusion time per batch of {settings.batch_size} (ms)"),
        (right, "GFLOPs per sample"),
    ):
        _log_axis(ax, tokens)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per modality")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    left.set_title("Bottleneck vs full cross-attention: time")
    right.set_title("FLOPs")
    left.legend(fontsize="small")
    return fig


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def run_scaling(
    settings: BenchSettings, output: Path, quick: bool = False
) -> dict[str, pd.DataFrame]:
    """Measure the four curves, write ``scaling_<name>.png`` and ``.csv`` into ``output``.

    ``quick`` shortens the tile, bottleneck and fusion-token curves (the series curve is cheap
    and always complete); it does not change ``settings``. Returns the frames by name
    (``series``, ``tile``, ``bottlenecks``, ``fusion_tokens``).
    """
    with torch_threads(settings.threads):
        curves = _curves(settings, quick)
    figures = {
        "series": plot_series(curves["series"], settings, _vit_ms(curves["tile"], settings)),
        "tile": plot_tile(curves["tile"], settings),
        "bottlenecks": plot_bottlenecks(curves["bottlenecks"], settings),
        "fusion_tokens": plot_fusion_tokens(curves["fusion_tokens"], settings),
    }
    output = Path(output)
    for name, fig in figures.items():
        save_figure(fig, output / f"scaling_{name}.png")
        _write_csv(curves[name], output / f"scaling_{name}.csv")
    return curves


def _vit_ms(tile: pd.DataFrame, settings: BenchSettings) -> float | None:
    """The bare ViT's ms per batch at the benchmark's tile size, if the tile curve has it."""
    rows = tile[(tile["model"] == TIMM_VIT) & (tile["tile"] == settings.image_size)]
    return float(rows["ms_per_batch"].iloc[0]) if len(rows) else None


def _curves(settings: BenchSettings, quick: bool) -> dict[str, pd.DataFrame]:
    """The four curves' frames by name."""
    tiles = QUICK["tile"] if quick else TILE_SIZES
    log.info("scaling: tile size")
    tile = tile_curve(settings, tiles)
    log.info("scaling: series length")
    series = series_curve(settings)
    log.info("scaling: bottleneck tokens")
    bottlenecks = bottleneck_curve(settings, QUICK["bottlenecks"] if quick else BOTTLENECKS)
    log.info("scaling: fusion tokens")
    fusion_tokens = fusion_tokens_curve(
        settings, QUICK["fusion_tokens"] if quick else FUSION_TOKENS
    )
    return {
        "series": series, "tile": tile, "bottlenecks": bottlenecks, "fusion_tokens": fusion_tokens,
    }  # fmt: skip
