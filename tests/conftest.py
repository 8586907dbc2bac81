"""Shared fixtures: paths to the real data bundle beside the checkout (../shared)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from fusion.configs import config_args, config_files

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSION_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_imgfocus.safetensors"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data bundle (``../shared/data``); the suite needs it and fails loudly without it."""
    assert DATA.is_dir(), f"real data bundle not found at {DATA} (set FUSION_SHARED)"
    return DATA


@pytest.fixture(scope="session")
def vit_weights() -> Path:
    assert WEIGHTS.is_file(), f"pretrained ViT weights not found at {WEIGHTS}"
    return WEIGHTS


IMAGE_SIZE = 56  # 4x4 patches of 14 px: the real pretrained ViT, cheap on a CPU


def config(name: str) -> list[str]:
    """``--config configs/base.yaml --config configs/variants/NAME.yaml``."""
    return config_args(config_files(name))


@pytest.fixture(scope="session")
def small_manifest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 train + 4 val + 4 test rows per label of the real benchmark (the test rows are val rows
    of the benchmark), paths made absolute."""
    frame = pd.read_csv(shared_data / "paired" / "manifest.csv")
    parts = []
    for label in sorted(frame["label"].unique()):
        train = frame[(frame["label"] == label) & (frame["split"] == "train")].head(10)
        val = frame[(frame["label"] == label) & (frame["split"] == "val")].head(8)
        parts += [train, val.head(4), val.tail(4).assign(split="test")]
    small = pd.concat(parts)
    small["image"] = [str(shared_data / p) for p in small["image"]]
    path = tmp_path_factory.mktemp("small") / "manifest.csv"
    small.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def places_manifest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 rows of every sensor of the real benchmark (192 rows, 53 sensors, no split column),
    paths made absolute: enough places per label for a place-grouped cross-validation."""
    frame = pd.read_csv(shared_data / "paired" / "manifest.csv")
    small = frame.groupby("sensor_id").head(3).drop(columns="split")
    small["image"] = [str(shared_data / p) for p in small["image"]]
    path = tmp_path_factory.mktemp("places") / "manifest.csv"
    small.to_csv(path, index=False)
    return path


@dataclass(frozen=True)
class TrainedRun:
    """A small MBT model fitted (2 epochs) and tested through the CLI on the real benchmark."""

    root: Path  # trainer folder: predictions_test.csv, confusion_test.png
    ckpt: Path  # root/checkpoints/last.ckpt
    args: list[str]  # the settings fit and test ran with (after the subcommand)
    cache: Path


@pytest.fixture(scope="session")
def trained_run(
    small_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path_factory
) -> TrainedRun:
    from fusion.cli import main

    root = tmp_path_factory.mktemp("run")
    cache = root / "cache"
    args = [
        *config("mbt_mid"),
        "--data.manifest", str(small_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.split", "manifest",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.cache_dir", str(cache),
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", "false",
    ]  # fmt: skip
    assert main(["fit", *args, "--trainer.max_epochs", "2"]) == 0
    ckpt = root / "checkpoints" / "last.ckpt"
    assert main(["test", *args, "--ckpt_path", str(ckpt)]) == 0
    return TrainedRun(root=root, ckpt=ckpt, args=args, cache=cache)
