"""How the benchmarks measure: wall-clock timing of interleaved calls, torch threads, FLOPs, and
peak memory (of a block, or of a call in a fresh process whose peak is its own).

Timings are medians over repeated calls after untimed warm-up ones, the calls interleaved round
by round, so that a burst of load from another process slows every call alike instead of one.
FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` plus the LSTM matrix products,
which it does not see inside the fused LSTM kernels (``2 * 4H * (in + H)`` per step, layer and
direction).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

K = TypeVar("K")


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


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
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
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
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


def max_rss_mib() -> float:
    """This process's peak resident set size so far, MiB: ``VmHWM`` of ``/proc/self/status``,
    the peak of its own address space (``ru_maxrss`` keeps the parent's peak across the exec of
    a spawned child, so it would report at least the parent's size), else ``ru_maxrss`` (KiB on
    Linux, bytes on macOS)."""
    hwm = _status_kib("VmHWM")
    if hwm:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def memory_peaks() -> Iterator[dict[str, float]]:
    """Peak RSS (:func:`max_rss_mib`: the process's peak so far, so work before the block counts
    too; measure in a fresh process) and peak anonymous RSS (``RssAnon``, sampled every 20 ms
    while the block runs; 0 where ``/proc`` has none), MiB, filled in on exit."""
    peaks: dict[str, float] = {}
    anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            anon[0] = max(anon[0], _status_kib("RssAnon"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()
        anon[0] = max(anon[0], _status_kib("RssAnon"))
        peaks["peak_rss_mib"] = max_rss_mib()
        peaks["peak_anon_mib"] = anon[0] / 1024


def _child(fn: Callable[..., dict[str, Any]], args: tuple, queue: mp.Queue) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as error:  # the parent reports it
        queue.put({"error": repr(error)})


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` (a module-level function returning a dict) in a new, spawned process, so
    that its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(fn, args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive():  # killed (out of memory, a signal) before reporting
                raise RuntimeError(f"{fn.__name__} died (exit code {process.exitcode})") from None
    process.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__} failed: {result['error']}")
    return result
