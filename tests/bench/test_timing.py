"""The benchmark's measuring: FLOPs of LSTMs, interleaved timing, the spread of timings."""

from __future__ import annotations

import torch
from torch import nn

from fusion.bench.timing import count_flops, lstm_flops, median_times, spread


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
