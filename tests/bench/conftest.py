"""One quick benchmark run (tiny batch and tiles, one timed call, the real pretrained ViT), shared
by the tests of what it measured and wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from fusion.bench.build import BenchSettings
from fusion.bench.models import run_bench


@dataclass(frozen=True)
class Bench:
    output: Path
    frame: pd.DataFrame


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory, vit_weights: Path) -> Bench:
    output = tmp_path_factory.mktemp("bench")
    frame = run_bench(output, BenchSettings(weights=str(vit_weights)), quick=True)
    return Bench(output, frame)
