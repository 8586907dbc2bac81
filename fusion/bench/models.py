"""Cost of the model variants against the bare timm ViT: throughput, memory, parameters, FLOPs.

``fusion bench`` measures, in one process, on one batch (same batch size, tile size and series
length for every row) on one machine:

- ``timm_vit``: the untouched timm backbone (``timm.create_model(..., num_classes=8)``), the floor
  every other row is a ratio to;
- ``vit`` and ``bilstm``: the project's image-only and series-only baselines;
- every fusion variant (``concat``, ``msift``, ``mbt_early``, ``mbt_mid``, ``mbt_late``) with the
  BiLSTM and with the TRANS-BLSTM series encoder (``mbt_mid+trans_blstm``, ...).

Every row's network is its config's (``configs/base.yaml`` + ``configs/variants/NAME.yaml``,
:func:`variants`), so the bench measures what the configs train. *Inference* is a
``torch.inference_mode`` forward of a full batch (image through the ViT, series through its encoder,
fusion, heads). A *training step* is forward + backward + an AdamW step on the trainable parameters;
the ViT runs in it (the configs' token cache, which skips the ViT when training, is not used, so the
step is the uncached worst case). To compare like with like, the timm floor is trained the same way:
its backbone is frozen (and kept in eval mode, as :class:`~fusion.models.vit.ViTEncoder` keeps a
frozen backbone) and only its linear head learns.

Throughput is samples/s from the median over ``repeats`` timed calls, after ``warmup`` untimed
ones; the rows are interleaved call by call (round-robin), so a burst of load from another process
slows every row alike instead of one. FLOPs per sample come from
:class:`torch.utils.flop_counter.FlopCounterMode` on a one-sample inference forward, plus the LSTM
matrix products, which it does not see inside the fused LSTM kernels
(``2 * 4H * (in + H)`` per step, layer and direction).

Peak memory is measured for each row in a fresh child process that builds the model (random
weights: their values do not change the memory) and runs one training step, whose peak bounds that
of inference (the frozen ViT runs without autograd in both): on CUDA ``max_memory_allocated``
(weights included), on CPU the rise of the peak resident set size (``ru_maxrss``) over the child's
own at start, i.e. weights, activations, gradients and optimizer state; allocator slack is
included and the number is approximate. The children are forked from a fork server (spawned where
there is none), so a script calling :func:`run_bench` needs the usual
``if __name__ == "__main__":`` guard.

Models are built on the meta device and materialised (:func:`build_model`), the pretrained
backbone copied in from one load of the weights file: the same weights as the usual construction,
without timm's slow random initialisation of a backbone about to be overwritten.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from fusion.configs import CHECKOUT_CONFIGS, config_files, net_config, variant_names
from fusion.data.series import CALENDAR_FEATURES
from fusion.io import atomic_path
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.models.vit import VIT_NAME

log = logging.getLogger(__name__)
K = TypeVar("K")

TIMM_VIT = "timm_vit"  # the bare timm backbone: the floor of every ratio
NUM_CLASSES = 8
N_COUNTS = 1
N_FEATURES = N_COUNTS + len(CALENDAR_FEATURES)  # one count channel + the calendar features
TARGET_RATIO = 0.85  # fusion inference throughput over the bare ViT's
SERIES_ENCODERS = ("bilstm", "trans_blstm")
COLUMNS = (
    "variant", "series_encoder", "fusion", "infer_sps", "train_sps", "infer_ratio",
    "train_ratio", "peak_mib", "params_m", "trainable_m", "gflops_per_sample", "meets_target",
)  # fmt: skip

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


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads (``None``: unchanged), then restore them."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@dataclass
class Case:
    """A model ready to be timed on one batch: :meth:`infer` and :meth:`train_step`."""

    name: str
    model: nn.Module
    forward: Callable[[], Tensor]
    labels: Tensor
    optimizer: torch.optim.Optimizer
    train_mode: bool = True  # False keeps the model in eval mode while training (timm floor)

    def infer(self) -> None:
        """One ``inference_mode`` forward of the batch."""
        self.model.eval()
        with torch.inference_mode():
            self.forward()

    def train_step(self) -> None:
        """Forward, cross-entropy, backward and an AdamW step on the trainable parameters."""
        self.model.train(self.train_mode)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(), self.labels).backward()
        self.optimizer.step()


def make_case(name: str, settings: BenchSettings, batch: Batch) -> Case:
    """Build variant ``name`` and bind it to ``batch`` with an AdamW optimizer (lr 1e-3)."""
    model = build_model(name, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Case(
        name,
        model,
        forward_fn(model, batch),
        batch.labels,
        torch.optim.AdamW(trainable, lr=1e-3),
        train_mode=name != TIMM_VIT,
    )


# ---------------------------------------------------------------------------------- measuring


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    calls: Mapping[K, Callable[[], object]], repeats: int, warmup: int, device: str = "cpu"
) -> dict[K, list[float]]:
    """Wall-clock seconds of ``repeats`` timed runs of each call, after ``warmup`` untimed ones;
    the calls are interleaved round by round."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[K, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_times(
    calls: Mapping[K, Callable[[], object]], repeats: int, warmup: int, device: str = "cpu"
) -> dict[K, float]:
    """Median of :func:`time_calls`' seconds for each call."""
    times = time_calls(calls, repeats, warmup, device)
    return {name: statistics.median(values) for name, values in times.items()}


def spread(times: Mapping[Any, list[float]]) -> float:
    """The largest ``(max - min) / median`` over the calls' timings: how much one call's timings
    vary, so how large a difference between calls can be noise."""
    return max((max(v) - min(v)) / statistics.median(v) for v in times.values())


def lstm_flops(lstm: nn.LSTM, x: Tensor) -> int:
    """Matrix-product FLOPs of ``lstm`` on input ``x`` (``(B, N, in)`` if batch-first): per step,
    layer and direction ``2 * 4H * (in + H)`` (input and recurrent products; gates not counted)."""
    batch, steps = (x.shape[0], x.shape[1]) if lstm.batch_first else (x.shape[1], x.shape[0])
    hidden = lstm.hidden_size
    out = lstm.proj_size or hidden
    directions = 2 if lstm.bidirectional else 1
    total = 0
    for layer in range(lstm.num_layers):
        width = lstm.input_size if layer == 0 else out * directions
        total += directions * 2 * 4 * hidden * (width + out) * batch * steps
    return total


def count_flops(model: nn.Module, forward: Callable[[], object]) -> int:
    """FLOPs of one call of ``forward`` (a forward of ``model``), without autograd.

    :class:`FlopCounterMode` counts matrix products, convolutions and attention; LSTM products
    are added with :func:`lstm_flops` for any ``nn.LSTM`` in which it counted nothing.
    """
    lstms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LSTM)}
    seen: dict[str, int] = {}
    hooks = [
        m.register_forward_hook(
            lambda module, args, _out, name=name: seen.__setitem__(
                name, seen.get(name, 0) + lstm_flops(module, args[0])
            )
        )
        for name, m in lstms.items()
    ]
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    extra = sum(
        flops for name, flops in seen.items() if not sum(counts.get(f"{root}.{name}", {}).values())
    )
    return int(counter.get_total_flops()) + extra


def _max_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _peak_memory_child(name: str, settings: BenchSettings, threads: int) -> float:
    """In a fresh child: build ``name``, run one training step, return the peak memory in MiB."""
    torch.set_num_threads(threads)
    before = _max_rss_mib()
    batch = make_batch(settings.batch_size, settings.image_size, settings.hours, settings.device)
    # Weight values do not change the memory; random ones spare reading the weights file.
    case = make_case(name, replace(settings, weights=None), batch)
    case.train_step()
    _sync(settings.device)
    if torch.device(settings.device).type == "cuda":
        return torch.cuda.max_memory_allocated(settings.device) / 2**20
    return _max_rss_mib() - before


def memory_context() -> BaseContext:
    """A start method whose children begin clean, for :func:`peak_memory`.

    Where there is one, a fork server is started now, importing this module (torch, timm, the
    models) in the background; its children are forked from a process that has run nothing, so
    no thread pool or CUDA context is inherited and the imports are paid once. Elsewhere: spawn.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    forkserver.ensure_running()
    return ctx


def wait_ready(ctx: BaseContext) -> None:
    """Return once ``ctx`` can start a child (a fork server has finished its imports), so that
    they do not overlap a timing."""
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pool.submit(os.getpid).result()


def peak_memory(
    names: list[str], settings: BenchSettings, ctx: BaseContext | None = None
) -> dict[str, float]:
    """Peak memory (MiB) of one training step of each variant, each in a fresh child process
    (two at a time on a multi-core CPU, sharing its threads: the peaks are per process)."""
    ctx = ctx or memory_context()
    on_cpu = torch.device(settings.device).type == "cpu"
    workers = min(2, len(names), os.cpu_count() or 1) if on_cpu else 1
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = {n: pool.submit(_peak_memory_child, n, settings, threads) for n in names}
        out = {name: future.result() for name, future in futures.items()}
    for name, peak in out.items():
        log.info("peak memory %s: %.0f MiB", name, peak)
    return out


def environment(settings: BenchSettings) -> dict[str, Any]:
    """Machine and library facts that the numbers depend on."""
    device = torch.device(settings.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {
        "device": f"{settings.device} ({name})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def run_models(settings: BenchSettings) -> pd.DataFrame:
    """Measure every variant (timm floor first); one row each, columns :data:`COLUMNS`.

    ``infer_sps`` / ``train_sps``: samples/s; ``*_ratio``: over the timm floor's (exactly 1 for
    it); ``peak_mib``: see the module docstring; ``params_m`` / ``trainable_m``: millions;
    ``gflops_per_sample``: inference; ``meets_target``: ``infer_ratio >= 0.85`` for fusion rows,
    missing for the others. Settings, environment and the timings' :func:`spread` are in
    ``frame.attrs``.
    """
    with torch_threads(settings.threads):
        return _run_models(settings)


def _run_models(settings: BenchSettings) -> pd.DataFrame:
    specs = variants()
    names = [TIMM_VIT, *specs]
    batch = make_batch(settings.batch_size, settings.image_size, settings.hours, settings.device)
    # The fork server for the memory children imports while the models are built, not later.
    ctx = memory_context() if settings.memory else None
    log.info("building %d models", len(names))
    cases = {name: make_case(name, settings, batch) for name in names}
    if ctx is not None:
        wait_ready(ctx)
    log.info("timing inference")
    infer_times = time_calls(
        {n: c.infer for n, c in cases.items()}, settings.repeats, settings.warmup, settings.device
    )
    log.info("timing training steps")
    train_times = time_calls(
        {n: c.train_step for n, c in cases.items()},
        settings.repeats,
        settings.warmup,
        settings.device,
    )
    infer = {name: statistics.median(t) for name, t in infer_times.items()}
    train = {name: statistics.median(t) for name, t in train_times.items()}
    one = batch.head(1)
    rows = []
    for name, case in cases.items():
        case.model.eval()
        flops = count_flops(case.model, forward_fn(case.model, one))
        spec = specs.get(name, {})
        rows.append(
            {
                "variant": name,
                "series_encoder": spec["series_encoder"] if spec.get("series") else "none",
                "fusion": spec.get("fusion", "none"),
                "infer_sps": settings.batch_size / infer[name],
                "train_sps": settings.batch_size / train[name],
                "params_m": sum(p.numel() for p in case.model.parameters()) / 1e6,
                "trainable_m": sum(
                    p.numel() for p in case.model.parameters() if p.requires_grad
                ) / 1e6,
                "gflops_per_sample": flops / 1e9,
            }
        )  # fmt: skip
    del cases, batch, one
    gc.collect()
    frame = pd.DataFrame(rows)
    floor = frame.set_index("variant").loc[TIMM_VIT]
    frame["infer_ratio"] = frame["infer_sps"] / floor["infer_sps"]
    frame["train_ratio"] = frame["train_sps"] / floor["train_sps"]
    if settings.memory:
        log.info("measuring peak memory (one child process per variant)")
        peaks = peak_memory(names, settings, ctx)
        frame["peak_mib"] = frame["variant"].map(peaks)
    else:
        frame["peak_mib"] = math.nan
    is_fusion = frame["fusion"] != "none"
    meets = frame["infer_ratio"].ge(TARGET_RATIO).astype("boolean")
    frame["meets_target"] = meets.where(is_fusion, pd.NA)
    frame = frame[list(COLUMNS)]
    frame.attrs["settings"] = asdict(settings)
    frame.attrs["environment"] = environment(settings)
    frame.attrs["spread"] = max(spread(infer_times), spread(train_times))
    return frame


# ---------------------------------------------------------------------------------- report


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    """The rows of ``frame`` (columns :data:`COLUMNS`) as a markdown table."""
    header = (
        "| variant | series encoder | fusion | inference samples/s | x bare ViT | "
        "train samples/s | x bare ViT | peak MiB | params M | trainable M | GFLOPs/sample | "
        f">= {TARGET_RATIO}x |"
    )
    lines = [header, "|" + "---|" * 3 + "---:|" * 8 + ":---:|"]
    for row in frame.itertuples(index=False):
        target = "" if pd.isna(row.meets_target) else ("yes" if row.meets_target else "no")
        peak = "n/a" if pd.isna(row.peak_mib) else f"{row.peak_mib:.0f}"
        lines.append(
            f"| {row.variant} | {row.series_encoder} | {row.fusion} | {row.infer_sps:.2f} | "
            f"{row.infer_ratio:.3f} | {row.train_sps:.2f} | {row.train_ratio:.3f} | {peak} | "
            f"{row.params_m:.2f} | {row.trainable_m:.3f} | {row.gflops_per_sample:.3f} | "
            f"{target} |"
        )
    return lines


def write_report(
    models_df: pd.DataFrame, output: Path, scaling: Mapping[str, pd.DataFrame] | None = None
) -> Path:
    """Write ``results.csv`` (the frame) and ``summary.md`` (settings, a markdown table of the
    ratios, which fusion variants meet the 0.85x inference target, the scaling figures) into
    ``output``, each atomically; return the path of ``summary.md``."""
    output = Path(output)
    with atomic_path(output / "results.csv") as tmp:
        models_df.to_csv(tmp, index=False)
    settings = models_df.attrs.get("settings", {})
    env = models_df.attrs.get("environment", {})
    fusion = models_df[models_df["fusion"] != "none"]
    meets = fusion.loc[fusion["meets_target"].fillna(False).astype(bool), "variant"].tolist()
    misses = [v for v in fusion["variant"] if v not in meets]
    lines = ["# fusion bench: cost of the model variants", ""]
    if settings:
        lines.append(
            f"Batch {settings['batch_size']}, {settings['image_size']} px tiles, "
            f"{settings['hours']} h series; median of {settings['repeats']} timed calls after "
            f"{settings['warmup']} warm-up calls, rows interleaved; ViT weights: "
            f"{settings['weights'] or 'random init'}."
        )
    if env:
        lines.append(
            f"Device {env['device']}, torch threads: {env['threads']}; torch {env['torch']}, "
            f"timm {env['timm']}, Python {env['python']}."
        )
    lines += [
        "",
        "Frozen ViT (`freeze=all`, 4 x 4 token grid) in every row; ratios are to the bare timm "
        "ViT (`timm_vit`, backbone frozen, linear head trained). Training step = forward + "
        "backward + AdamW on the trainable parameters, ViT included (no token cache). Peak "
        "memory: one training step in a fresh process (CPU: rise of peak RSS; CUDA: "
        "`max_memory_allocated`).",
        "",
        *_markdown_table(models_df),
        "",
        f"Fusion variants meeting the {TARGET_RATIO}x inference target: "
        f"{', '.join(meets) if meets else 'none'} ({len(meets)} of {len(fusion)})"
        + (f"; below it: {', '.join(misses)}." if misses else "."),
    ]
    if models_df.attrs.get("spread") and settings.get("repeats", 1) > 1:
        lines.append(
            f"The timed calls of one row ranged over up to {models_df.attrs['spread']:.0%} of "
            "their median (max - min): differences between rows smaller than that may be noise; "
            "the FLOPs column shows the work each adds to the ViT."
        )
    if scaling:
        lines += ["", "## Scaling curves", ""]
        lines += [f"- `scaling_{key}.png` (data: `scaling_{key}.csv`)" for key in scaling]
    with atomic_path(output / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return output / "summary.md"


def run_bench(output: Path, settings: BenchSettings, quick: bool = False) -> pd.DataFrame:
    """Measure the variants and the scaling curves; write everything under ``output``.

    Writes ``results.csv``, ``summary.md``, ``scaling_*.png`` and ``scaling_*.csv``. ``quick``
    uses :func:`quick_settings` and short curves (for tests). Returns the variants' frame.
    """
    from fusion.bench.scaling import run_scaling  # scaling builds on this module

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if quick:
        settings = quick_settings(settings)
    start = time.perf_counter()
    models = run_models(settings)
    write_report(models, output)
    curves = run_scaling(settings, output, quick=quick)
    write_report(models, output, curves)
    log.info("bench finished in %.0f s", time.perf_counter() - start)
    return models
