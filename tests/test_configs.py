"""The network settings (``model.net``, :class:`NetConfig`): checked and listed by the CLI, saved
in checkpoints as data."""

from __future__ import annotations

import inspect
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from fusion.cli import main
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.task import FusionTask
from fusion.training import build_cli
from tests.conftest import IMAGE_SIZE

DATA_FACTS = {"num_classes", "in_chans", "n_features", "n_counts", "img_size"}


def test_net_config_holds_the_classifier_settings_with_its_defaults() -> None:
    params = inspect.signature(FusionClassifier.__init__).parameters
    settings = {n: p.default for n, p in params.items() if n not in {"self", *DATA_FACTS}}
    assert {f.name: f.default for f in fields(NetConfig)} == settings


def test_a_misspelt_net_setting_is_refused_by_name(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_cli(["--config", "configs/mbt_mid.yaml", "--model.net.fuson", "mbt"], run=False)
    assert info.value.code == 2
    assert "model.net.fuson" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  net:\n    fusion_layers: late\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/mbt_mid.yaml", "--config", str(typo)])
    assert "model.net.fusion_layers" in capsys.readouterr().err


def test_fit_help_lists_and_explains_every_net_setting(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for field in fields(NetConfig):
        assert f"--model.net.{field.name} " in text, field.name
    assert "MBT's first fused layer" in text  # fusion_layer's line of the NetConfig docstring


def test_a_fitted_checkpoint_holds_its_net_settings_as_data(
    small_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path: Path
) -> None:
    args = [
        "--config", "configs/msift.yaml",
        "--refit", "false",
        "--data.manifest", str(small_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.split", "manifest",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--model.cache_dir", str(tmp_path / "cache"),
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--model.net.series_dim", "16",
        "--model.net.fusion_dim", "16",
        "--model.net.fusion_heads", "2",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks.dirpath", str(tmp_path / "checkpoints"),
    ]  # fmt: skip
    assert main(["fit", *args]) == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    expected = NetConfig(
        fusion="msift", fusion_depth=2, vit_weights=str(vit_weights), token_grid=2, series_dim=16,
        fusion_dim=16, fusion_heads=2, dropout=0.3, experts=True, isolate_series=True,
    )  # fmt: skip
    assert saved["net"] == asdict(expected)  # a plain dict
    task = FusionTask.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    assert task.net.fusion_kind == "msift" and len(task.net.fusion.image_layers) == 2
    assert task.net.head_names == ("fused", "image", "series")
