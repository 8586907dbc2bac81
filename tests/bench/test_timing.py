"""The benchmark's measuring: FLOPs of LSTMs, interleaved timing, the spread of timings, peak
memory of a call in a fresh process."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fusion.bench.timing import (
    count_flops,
    in_fresh_process,
    lstm_flops,
    median_times,
    memory_peaks,
    spread,
)


def test_lstm_flops_are_counted_once() -> None:
    lstm = nn.LSTM(10, 6, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 5, 10)
    per_token = 2 * (2 * 4 * 6 * (10 + 6)) + 2 * (2 * 4 * 6 * (12 + 6))
    assert lstm_flops(lstm, x) == per_token * 3 * 5
    model = nn.Sequential(lstm)
    counted = count_flops(model, lambda: model(x))
    assert per_token * 3 * 5 <= counted < 2 * per_token * 3 * 5


def test_median_times_interleaves_the_calls() -> None:
    order: list[str] = []
    times = median_times(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
    )
    assert order == ["a", "b"] * 4
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert spread({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 2.0]}) == 1.0


def _allocate(mib: int) -> dict[str, float]:
    with memory_peaks() as peaks:
        block = bytearray(mib * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
    return {**peaks, "size": len(block)}


def _fail() -> dict[str, float]:
    raise OSError("disk on fire")


def _die() -> dict[str, float]:
    os._exit(3)  # as an out-of-memory kill would: no report


def test_fresh_process_peaks_are_its_own() -> None:
    small, large = in_fresh_process(_allocate, 1), in_fresh_process(_allocate, 1500)
    assert large["size"] == 1500 * 2**20
    assert large["peak_rss_mib"] - small["peak_rss_mib"] > 600  # the child's, not ours
    assert large["peak_anon_mib"] - small["peak_anon_mib"] > 600
    with pytest.raises(RuntimeError, match="_fail failed: OSError"):
        in_fresh_process(_fail)
    with pytest.raises(RuntimeError, match=r"_die died \(exit code 3\)"):
        in_fresh_process(_die)
