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
slows every row alike instead of one. FLOPs per sample are counted on a one-sample inference
forward (:func:`fusion.bench.timing.count_flops`, LSTM matrix products included).

Peak memory is measured for each row in a fresh child process that builds the model (random
weights: their values do not change the memory) and runs one training step, whose peak bounds that
of inference (the frozen ViT runs without autograd in both): on CUDA ``max_memory_allocated``
(weights included), on CPU the rise of the peak resident set size (``ru_maxrss``) over the child's
own at start, i.e. weights, activations, gradients and optimizer state; allocator slack is
included and the number is approximate. The children are forked from a fork server (spawned where
there is none), so a script calling :func:`run_bench` needs the usual
``if __name__ == "__main__":`` guard.

The variants, their settings and the batch are those of :mod:`fusion.bench.build`; the timing
and FLOP counting are :mod:`fusion.bench.timing`'s; :func:`run_bench` adds the scaling curves of
:mod:`fusion.bench.scaling`.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import pandas as pd
import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fusion.bench.build import (
    TARGET_RATIO,
    TIMM_VIT,
    Batch,
    BenchSettings,
    build_model,
    forward_fn,
    make_batch,
    quick_settings,
    variants,
)
from fusion.bench.scaling import run_scaling
from fusion.bench.timing import (
    count_flops,
    max_rss_mib,
    spread,
    sync,
    time_calls,
    torch_threads,
)
from fusion.io import atomic_path

log = logging.getLogger(__name__)

COLUMNS = (
    "variant", "series_encoder", "fusion", "infer_sps", "train_sps", "infer_ratio",
    "train_ratio", "peak_mib", "params_m", "trainable_m", "gflops_per_sample", "meets_target",
)  # fmt: skip


@dataclass
class Case:
    """A model ready to be timed on one batch: :meth:`infer` and :meth:`train_step`."""

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
        model,
        forward_fn(model, batch),
        batch.labels,
        torch.optim.AdamW(trainable, lr=1e-3),
        train_mode=name != TIMM_VIT,
    )


# ---------------------------------------------------------------------------------- measuring


def _peak_memory_child(name: str, settings: BenchSettings, threads: int) -> float:
    """In a fresh child: build ``name``, run one training step, return the peak memory in MiB."""
    torch.set_num_threads(threads)
    before = max_rss_mib()
    batch = make_batch(settings.batch_size, settings.image_size, settings.hours, settings.device)
    # Weight values do not change the memory; random ones spare reading the weights file.
    case = make_case(name, replace(settings, weights=None), batch)
    case.train_step()
    sync(settings.device)
    if torch.device(settings.device).type == "cuda":
        return torch.cuda.max_memory_allocated(settings.device) / 2**20
    return max_rss_mib() - before


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
) -> None:
    """Write ``results.csv`` (the frame) and ``summary.md`` (settings, a markdown table of the
    ratios, which fusion variants meet the 0.85x inference target, the scaling figures) into
    ``output``, each atomically."""
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


def run_bench(output: Path, settings: BenchSettings, quick: bool = False) -> pd.DataFrame:
    """Measure the variants and the scaling curves; write everything under ``output``.

    Writes ``results.csv``, ``summary.md``, ``scaling_*.png`` and ``scaling_*.csv``. ``quick``
    uses :func:`quick_settings` and short curves (for tests). Returns the variants' frame.
    """
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
