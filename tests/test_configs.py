"""The configs (``configs/base.yaml`` + ``configs/variants/NAME.yaml``) and the network settings
they hold (``model.net``, :class:`NetConfig`): each variant resolves to its former settings, the
run's files are derived from its folder, ``model.net`` is checked and listed by the CLI and saved
in checkpoints as data."""

from __future__ import annotations

import inspect
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from fusion.cli import main
from fusion.configs import variant_names
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.task import FusionTask
from fusion.training import FusionCLI, build_cli
from tests.conftest import IMAGE_SIZE, config

DATA_FACTS = {"num_classes", "in_chans", "n_features", "n_counts", "img_size"}

# What each variant was before the configs were split into base + overlay (configs/NAME.yaml).
WEIGHTS = "../shared/weights/dinov2_vits14_imgfocus.safetensors"
IMAGE = {"vit_weights": WEIGHTS, "freeze": "all", "token_grid": 4}
SERIES = {"series_encoder": "bilstm", "series_dim": 64, "dropout": 0.3}
FUSED = {**IMAGE, **SERIES, "experts": True, "isolate_series": True}
TRANS_BLSTM = {"series_encoder": "trans_blstm", "trans_blstm_variant": 1}
FORMER_NET = {
    "bilstm": {"image": False, "fusion": "none", **SERIES},
    "vit": {"series": False, "fusion": "none", **IMAGE},
    "concat": {**FUSED, "fusion": "concat"},
    "msift": {**FUSED, "fusion": "msift", "fusion_depth": 2},
    "msift_trans_blstm": {**FUSED, "fusion": "msift", "fusion_depth": 2, **TRANS_BLSTM},
    "mbt_early": {**FUSED, "fusion": "mbt", "fusion_layer": "early", "fusion_depth": 4},
    "mbt_mid": {**FUSED, "fusion": "mbt", "fusion_layer": "mid", "fusion_depth": 4},
    "mbt_late": {**FUSED, "fusion": "mbt", "fusion_layer": "late", "fusion_depth": 4},
    "mbt_mid_trans_blstm": {
        **FUSED, "fusion": "mbt", "fusion_layer": "mid", "fusion_depth": 4, **TRANS_BLSTM,
    },
}  # fmt: skip
FORMER_COMMON = {
    "seed_everything": 0,
    "refit": True,
    "trainer.accelerator": "auto",
    "trainer.devices": 1,
    "trainer.max_epochs": 15,
    "trainer.deterministic": True,
    "trainer.log_every_n_steps": 10,
    "model.lr": 1e-3,
    "model.head_lr": 1e-2,
    "data.manifest": "../shared/data/paired/manifest.csv",
    "data.split": "place",
    "data.groups": "../shared/data/footfall/sensors.csv",
    "data.val_fraction": 0.25,
    "data.batch_size": 32,
    "data.image_size": 224,
    "data.band_stats": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
}
# Settings a model without that branch never reads (the base's apply to the variants that have it).
IMAGE_ONLY = {"vit_name", "vit_weights", "freeze", "token_grid"}
SERIES_ONLY = {"series_encoder", "series_dim", "series_depth", "trans_blstm_variant", "patch_hours"}


class Parsed(FusionCLI):
    """The settings only: nothing instantiated, no data read."""

    def instantiate_classes(self) -> None:
        pass


def test_the_variants_are_the_former_configs() -> None:
    assert variant_names() == sorted(FORMER_NET)


@pytest.mark.parametrize("name", sorted(FORMER_NET))
def test_base_and_overlay_give_the_former_settings(name: str) -> None:
    settings = Parsed(config(name), run=False).config
    for key, value in FORMER_COMMON.items():
        assert settings[key] == value, key
    trainer = settings["trainer"]
    assert trainer["default_root_dir"] == f"runs/{name}"
    assert trainer["logger"] is None and trainer["callbacks"] is None  # derived from the folder
    former = asdict(NetConfig(**FORMER_NET[name]))
    unused = (set() if former["image"] else IMAGE_ONLY) | (
        set() if former["series"] else SERIES_ONLY
    )
    net = settings["model.net"].as_dict()
    assert {k: v for k, v in net.items() if k not in unused} == {
        k: v for k, v in former.items() if k not in unused
    }
    fused = former["fusion"] != "none"
    assert settings["model.modality_dropout"] == (0.3 if fused else 0.0)
    if former["series"]:  # a series branch is held back hard
        assert settings["model.series_weight_decay"] == 1.0


def _data(small_manifest: Path, shared_data: Path, tmp_path: Path) -> list[str]:
    return [
        "--data.manifest", str(small_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.split", "manifest",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip


def test_loggers_and_callbacks_follow_the_run_folder_unless_given(
    small_manifest: Path, shared_data: Path, tmp_path: Path
) -> None:
    args = [*config("bilstm"), *_data(small_manifest, shared_data, tmp_path)]
    root = tmp_path / "run"
    trainer = build_cli([*args, "--trainer.default_root_dir", str(root)], run=False).trainer
    assert [(type(x), x.save_dir, x.name) for x in trainer.loggers] == [
        (CSVLogger, str(root), "logs"),
        (TensorBoardLogger, str(root), "logs"),
    ]
    (checkpoint,) = trainer.checkpoint_callbacks
    assert checkpoint.dirpath == str(root / "checkpoints") and checkpoint.filename == "last"
    assert not checkpoint._enable_version_counter  # a new run replaces last.ckpt
    assert any(isinstance(c, RichProgressBar) for c in trainer.callbacks)

    own = tmp_path / "own"
    trainer = build_cli(
        [*args, "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
         "--trainer.callbacks.dirpath", str(own)],
        run=False,
    ).trainer  # fmt: skip
    assert trainer.loggers == []
    assert [c.dirpath for c in trainer.checkpoint_callbacks] == [str(own)]
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)


def test_the_classifier_takes_its_settings_from_net_config() -> None:
    """The network's settings and their defaults live in NetConfig alone; keywords override
    single fields, and an unknown one is refused."""
    params = inspect.signature(FusionClassifier.__init__).parameters
    assert set(params) == {"self", *DATA_FACTS, "net", "settings"}
    net = NetConfig(image=False, fusion="none", series_dim=24, series_depth=1)
    model = FusionClassifier(4, net=net)
    assert model.image_encoder is None and model.series_encoder.out_dim == 24
    assert FusionClassifier(4, net=net, series_dim=16).series_encoder.out_dim == 16
    with pytest.raises(TypeError, match="fusion_layers"):
        FusionClassifier(4, net=net, fusion_layers="late")


def test_a_misspelt_net_setting_is_refused_by_name(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_cli([*config("mbt_mid"), "--model.net.fuson", "mbt"], run=False)
    assert info.value.code == 2
    assert "model.net.fuson" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  net:\n    fusion_layers: late\n")
    with pytest.raises(SystemExit):
        main(["fit", *config(str(typo))])
    assert "model.net.fusion_layers" in capsys.readouterr().err


def test_fit_help_lists_and_explains_every_net_setting(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for field in fields(NetConfig):
        assert f"--model.net.{field.name} " in text, field.name
    assert "MBT's first fused layer" in text  # fusion_layer's line of the NetConfig docstring


def test_a_fit_logs_and_checkpoints_in_its_folder_with_the_net_settings_as_data(
    small_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path: Path
) -> None:
    small = {"vit_weights": str(vit_weights), "token_grid": 2, "series_dim": 16, "fusion_dim": 16,
             "fusion_heads": 2}  # fmt: skip
    args = [
        *config("msift"), *_data(small_manifest, shared_data, tmp_path),
        *[arg for key, value in small.items() for arg in (f"--model.net.{key}", str(value))],
        "--refit", "false",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    assert main(["fit", *args]) == 0
    logs = tmp_path / "logs"
    assert (logs / "version_0" / "metrics.csv").is_file()
    assert list(logs.glob("version_*/events.out.tfevents.*"))  # TensorBoard's: the next version
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert saved["net"] == asdict(NetConfig(**{**FORMER_NET["msift"], **small}))  # a plain dict
    task = FusionTask.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    assert task.net.fusion_kind == "msift" and len(task.net.fusion.image_layers) == 2
    assert task.net.head_names == ("fused", "image", "series")
