"""What in one sample's tile and series the fused output rests on: a gradient x input map.

Method (named in every figure's title, :data:`METHOD`): for the fused predicted class ``c``,
the gradient of ``log p_fused(c)`` (the calibrated output ``fusion predict`` writes, all heads
pooled) times the input it is taken with respect to (Shrikumar et al. 2016, "Not Just a Black
Box: Learning Important Features Through Propagating Activation Differences", arXiv:1605.01713):

- **Image**: the ViT's patch tokens where the model pools them to its token grid
  (:meth:`~fusion.models.vit.ViTEncoder.backbone_tokens`; for the frozen ViT, its final tokens),
  ``(H, W)`` patches of 14 px, each token's gradient x token summed over its features. The
  frozen ViT runs once, without gradients; what follows it (pooling, the float16 rounding of a
  cached token, the fusion, the heads) is differentiated.
- **Series**: the count channels as the model reads them (``log1p`` counts), gradient x value
  summed over the channels, one value per hour ``(T,)``. The model standardises each window
  first, so this equals the gradient x (value - the window's mean): an hour matters by how far
  it is from the window's level and how much the output depends on it. Calendar features are
  left out (they are the same for every place); absent hours get 0.

Positive: the token or hour raises ``p_fused(c)``; negative: it lowers it. ``isolate_series``
(the fusion reads the series tokens without sending gradients back while training) is switched
off while differentiating, so the series map also counts what the fusion makes of the series;
the output values are unchanged (a detach changes no value).

The sample is read as ``fusion predict`` reads it (:func:`fusion.predict.load_model`,
:class:`fusion.data.prediction.ManifestSamples`, the manifest checked whole).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt
from torch import Tensor
from torch.utils.data import default_collate

from fusion.data.prediction import ManifestSamples
from fusion.data.samples import Sample
from fusion.errors import InputError
from fusion.io import atomic_path, check_replaceable
from fusion.models.classifier import FusionClassifier
from fusion.models.experts import pool_experts
from fusion.plots import display_rgb, save_figure
from fusion.predict import load_model
from fusion.task import FusionTask

METHOD = "gradient x input of log p(fused class)"


@dataclass
class Saliency:
    """One sample's fused prediction and its gradient x input maps (module docstring).

    ``tile``, ``patches`` and ``prefix`` are None without an image; ``series``, ``mask`` and
    ``hours`` None without a series."""

    sample_id: str
    classes: tuple[str, ...]
    probs: np.ndarray  # (K,) calibrated fused probabilities, as fusion predict writes them
    tile: np.ndarray | None  # (C, S, S) the tile as the model reads it (normalised)
    patches: np.ndarray | None  # (H, W) per ViT patch token
    prefix: np.ndarray | None  # (P,) per prefix token (the CLS token)
    series: np.ndarray | None  # (T, V) count channels as the model reads them, 0 where absent
    mask: np.ndarray | None  # (T,) bool, True = hour present
    hours: np.ndarray | None  # (T,) per hour, summed over the V count channels
    local_hour: np.ndarray | None  # (T,) int 0-23, each hour's local hour of day
    weekday: np.ndarray | None  # (T,) int 0-6 (Monday 0), each hour's local weekday
    start: pd.Timestamp | None = None  # the window's first hour
    method: str = METHOD

    @property
    def pred(self) -> str:
        """The fused predicted class ``c``."""
        return self.classes[int(self.probs.argmax())]

    @property
    def days(self) -> np.ndarray | None:
        """``(T // 24,)`` the hours' values summed per day of the window."""
        if self.hours is None:
            return None
        days = len(self.hours) // 24
        return self.hours[: days * 24].reshape(days, 24).sum(axis=1)

    @property
    def by_hour_of_day(self) -> np.ndarray | None:
        """``(24,)`` the hours' values summed per local hour of day (0-23)."""
        if self.hours is None or self.local_hour is None:
            return None
        return np.bincount(self.local_hour, weights=self.hours, minlength=24)

    @property
    def by_weekday(self) -> np.ndarray | None:
        """``(7,)`` the hours' values summed per local weekday (Monday first)."""
        if self.hours is None or self.weekday is None:
            return None
        return np.bincount(self.weekday, weights=self.hours, minlength=7)


@contextmanager
def _gradients_through_the_fusion(net: FusionClassifier):
    """Let the fused head's gradient reach the series encoder (``isolate_series`` off)."""
    isolate = net.isolate_series
    net.isolate_series = False
    try:
        yield
    finally:
        net.isolate_series = isolate


def _as_cached(tokens: Tensor) -> Tensor:
    """``tokens`` rounded to float16 as a cached token is, with the gradient passed through
    unchanged. The value is exactly the rounded one: ``r - t`` is exact for floats ``r``, ``t``
    within a factor 2 of each other (Sterbenz), so ``t + (r - t)`` is ``r``."""
    return tokens + (tokens.half().float() - tokens).detach()


def _calendar(features: np.ndarray, n_counts: int) -> tuple[np.ndarray, np.ndarray]:
    """Local hour of day ``(T,)`` and weekday ``(T,)`` decoded from a window's calendar features
    ``(T, F)`` (sine and cosine of each after the ``n_counts`` count channels,
    :func:`fusion.data.series.calendar_features`)."""
    sin_h, cos_h, sin_d, cos_d = features[:, n_counts : n_counts + 4].T
    hour = np.rint(np.arctan2(sin_h, cos_h) * 24 / (2 * np.pi)).astype(np.int64) % 24
    day = np.rint(np.arctan2(sin_d, cos_d) * 7 / (2 * np.pi)).astype(np.int64) % 7
    return hour, day


def saliency(task: FusionTask, sample: Sample, sample_id: str = "") -> Saliency:
    """The gradient x input maps of one ``sample`` (an item of
    :class:`~fusion.data.prediction.ManifestSamples`) for ``task``'s fused predicted class.

    Its ``probs`` are the fused output ``fusion predict`` gives the sample: the model runs the
    way :meth:`FusionTask.predict_step` runs it, on the same inputs."""
    net = task.net
    if net.fusion_kind == "none":
        raise InputError("the model reads one view: nothing is fused to explain")
    batch = default_collate([sample])
    has_image, has_series = bool(batch["has_image"][0]), bool(batch["has_series"][0])
    if not (has_image or has_series):
        raise InputError(f"sample '{sample_id}' has neither view: {batch['note'][0]}")
    task.eval()
    encoder = net.image_encoder
    assert encoder is not None
    with torch.no_grad():  # the ViT up to its patch tokens: they are the input here
        unpooled = encoder.backbone_tokens(batch["image"]).detach()  # (1, P + H*W, D)
    unpooled.requires_grad_(True)
    series = batch["series"].clone().requires_grad_(True)  # (1, T, F)
    with torch.enable_grad(), _gradients_through_the_fusion(net):
        tokens = encoder.pool_tokens(unpooled)[0]
        if encoder.cacheable:  # as FusionClassifier.encode_image
            tokens = encoder.trainable_part(_as_cached(tokens))
        heads = net.heads(
            image=batch["image"], series=series, series_mask=batch["series_mask"],
            has_image=batch["has_image"], has_series=batch["has_series"], image_tokens=tokens,
        )  # fmt: skip
        probs = task.calibrated(pool_experts(heads, net.view_weights))[0]  # (K,)
        target = torch.log(probs[probs.argmax()])
        image_grad, series_grad = torch.autograd.grad(target, [unpooled, series])
    image_map = (image_grad * unpooled)[0].sum(dim=-1).detach().numpy()  # (P + H*W,)
    n_counts = net.n_counts
    hours = (series_grad * series)[0, :, :n_counts].sum(dim=-1).detach().numpy()  # (T,)
    grid = encoder.grid
    prefix = encoder.num_prefix
    local_hour, weekday = _calendar(batch["series"][0].numpy(), n_counts)
    return Saliency(
        sample_id=sample_id,
        classes=tuple(task.classes),
        probs=probs.detach().numpy(),
        tile=batch["image"][0].numpy() if has_image else None,
        patches=image_map[prefix:].reshape(grid) if has_image else None,
        prefix=image_map[:prefix] if has_image else None,
        series=batch["series"][0, :, :n_counts].numpy() if has_series else None,
        mask=batch["series_mask"][0].numpy() if has_series else None,
        hours=hours if has_series else None,
        local_hour=local_hour if has_series else None,
        weekday=weekday if has_series else None,
    )


def sample_saliency(
    ckpt: str | os.PathLike[str],
    manifest: str | os.PathLike[str],
    sample_id: str,
    *,
    series: str | os.PathLike[str] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    timezone: str | None = None,
) -> Saliency:
    """:func:`saliency` of the row ``sample_id`` of ``manifest``, read by ``ckpt``'s model as
    ``fusion predict --manifest`` reads it."""
    task, contract = load_model(ckpt)
    if task.net.fusion_kind == "none":
        raise InputError("the model reads one view: nothing is fused to explain", file=ckpt)
    samples = ManifestSamples(
        manifest, contract, series=series, image_root=image_root, timezone=timezone
    )
    rows = np.flatnonzero(samples.frame["sample_id"].to_numpy() == str(sample_id))
    if not len(rows):
        raise InputError(f"no row with sample_id '{sample_id}'", file=manifest, field="sample_id")
    row = int(rows[0])
    result = saliency(task, samples[row], str(sample_id))
    result.start = samples.starts[row]
    return result


# ---------------------------------------------------------------------------------- figure


def plot_saliency(result: Saliency) -> plt.Figure:
    """The tile with its patch map over it (left); the series, its per-hour map with the day
    totals, and the map summed per local hour of day and per weekday (right). A view the
    sample lacks is said so in its panels."""
    fig, axes = plt.subplot_mosaic(
        [["tile", "series", "series"], ["tile", "hours", "hours"], ["tile", "hod", "dow"]],
        figsize=(14, 7.5), width_ratios=[1.4, 1.3, 0.7], layout="constrained",
    )  # fmt: skip
    _draw_tile(axes["tile"], result)
    _draw_series(axes["series"], axes["hours"], result)
    _draw_profiles(axes["hod"], axes["dow"], result)
    p = result.probs.max()
    fig.suptitle(f"{result.sample_id}: fused {result.pred} ({p:.0%}); {result.method}",
                 fontsize=10)  # fmt: skip
    return fig


def _limit(values: np.ndarray) -> float:
    return float(np.abs(values).max()) or 1.0


def _no_view(ax: plt.Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _signed_bars(ax: plt.Axes, x: np.ndarray, values: np.ndarray, **kwargs: object) -> None:
    """Bars of ``values`` at ``x``, red where positive, blue where negative, symmetric limits."""
    ax.bar(x, values, color=np.where(values >= 0, "tab:red", "tab:blue"), **kwargs)
    limit = _limit(values)
    ax.set_ylim(-limit * 1.05, limit * 1.05)
    ax.axhline(0, color="black", linewidth=0.5)


def _draw_tile(ax: plt.Axes, result: Saliency) -> None:
    if result.tile is None or result.patches is None or result.prefix is None:
        _no_view(ax, "no image")
        return
    ax.set_xticks([])
    ax.set_yticks([])
    tile = result.tile
    ax.imshow(display_rgb(tile, np.ones(tile.shape[1:], bool)))
    size = tile.shape[1]
    limit = _limit(result.patches)
    shown = ax.imshow(
        result.patches, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.5,
        extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest",
    )  # fmt: skip
    fig = ax.get_figure()
    assert fig is not None
    fig.colorbar(shown, ax=ax, location="bottom", shrink=0.8, label="per patch token (red raises)")
    h, w = result.patches.shape
    ax.set_title(f"image: ViT patch tokens ({h} x {w}); CLS token {result.prefix[0]:+.4f}",
                 fontsize=9)  # fmt: skip


def _draw_series(top: plt.Axes, bottom: plt.Axes, result: Saliency) -> None:
    if result.series is None or result.hours is None or result.mask is None:
        _no_view(top, "no series")
        _no_view(bottom, "no series")
        return
    t = np.arange(len(result.hours)) / 24  # days from the window's start
    top.plot(t, np.where(result.mask[:, None], result.series, np.nan), linewidth=0.7)
    top.set_ylabel("log1p count")
    start = "" if result.start is None else f" from {result.start}"
    if result.local_hour is not None:
        start += f", local hour {result.local_hour[0]}"
    top.set_title(f"series ({len(t)} h{start})", fontsize=9)
    top.sharex(bottom)
    top.tick_params(labelbottom=False)
    _signed_bars(bottom, t, result.hours, width=1 / 24, align="edge")
    days = result.days
    if days is not None and len(days):
        twin = bottom.twinx()
        twin.step(np.arange(len(days) + 1), [*days, days[-1]], where="post", color="black",
                  linewidth=0.8)  # fmt: skip
        limit = _limit(days)
        twin.set_ylim(-limit * 1.05, limit * 1.05)
        twin.set_ylabel("per day (line)", fontsize=8)
    bottom.set_ylabel("per hour")
    bottom.set_xlabel("days from the window's start")
    bottom.set_title("what each hour adds to log p(fused class) (red raises it)", fontsize=9)


def _draw_profiles(hod: plt.Axes, dow: plt.Axes, result: Saliency) -> None:
    by_hour, by_day = result.by_hour_of_day, result.by_weekday
    if by_hour is None or by_day is None:
        _no_view(hod, "no series")
        _no_view(dow, "no series")
        return
    _signed_bars(hod, np.arange(24), by_hour)
    hod.set_xticks(range(0, 24, 3))
    hod.set_xlabel("local hour of day")
    hod.set_title("summed per hour of day", fontsize=9)
    _signed_bars(dow, np.arange(7), by_day)
    dow.set_xticks(range(7), ["Mo", "Tu", "We", "Th", "Fr", "Sa", "Su"])
    dow.set_title("summed per weekday", fontsize=9)


def _file_stem(sample_id: str) -> str:
    return "saliency_" + (re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id) or "sample")


def write_saliency(result: Saliency, output: str | os.PathLike[str]) -> dict[str, Path]:
    """``output/saliency_<id>.png`` (:func:`plot_saliency`) and ``saliency_<id>.npz`` (the
    maps: ``probs``, ``classes``, ``patches``, ``prefix``, ``hours``, ``days``,
    ``by_hour_of_day``, ``by_weekday``, ``series``, ``mask``; a missing view's arrays are
    absent), each written atomically."""
    stem = Path(output) / _file_stem(result.sample_id)
    files = {"figure": stem.with_suffix(".png"), "arrays": stem.with_suffix(".npz")}
    for path in files.values():
        check_replaceable(path)
    arrays = {
        "probs": result.probs, "classes": np.array(result.classes), "patches": result.patches,
        "prefix": result.prefix, "hours": result.hours, "days": result.days,
        "by_hour_of_day": result.by_hour_of_day, "by_weekday": result.by_weekday,
        "series": result.series, "mask": result.mask,
    }  # fmt: skip
    with atomic_path(files["arrays"]) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **{k: v for k, v in arrays.items() if v is not None})
    save_figure(plot_saliency(result), files["figure"])
    return files
