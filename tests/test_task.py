"""The fusion task on a small slice of the real benchmark: training, missing views, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from fusion.calibration import calibrate
from fusion.cli import main
from fusion.data.datamodule import FusionDataModule
from fusion.task import FusionTask
from tests.conftest import IMAGE_SIZE, TrainedRun


@pytest.fixture(scope="module")
def dm(small_manifest: Path, shared_data: Path, tmp_path_factory) -> FusionDataModule:
    dm = FusionDataModule(
        manifest=str(small_manifest),
        series=str(shared_data / "footfall" / "counts.csv.gz"),
        image_size=IMAGE_SIZE,
        batch_size=30,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    dm.setup()
    return dm


def first_batch(dm: FusionDataModule) -> dict[str, torch.Tensor]:
    """30 training rows drawn by a fixed generator (independent of the loaders' sampler)."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dm.dataset("train"), batch_size=30, shuffle=True, generator=generator)
    return next(iter(loader))


def net(vit_weights: Path, **kwargs) -> dict:
    return {"vit_weights": str(vit_weights), "token_grid": 2, "fusion_dim": 32,
            "series_dim": 32, "fusion_heads": 2, **kwargs}  # fmt: skip


@pytest.mark.parametrize("fusion", ["mbt", "msift", "concat"])
def test_few_steps_on_real_data_lower_the_loss(dm, vit_weights, fusion) -> None:
    torch.manual_seed(0)
    task = FusionTask(data_info=dm.info(), net=net(vit_weights, fusion=fusion), lr=3e-3)
    batch = first_batch(dm)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    task.train()
    losses = []
    for _ in range(12):
        loss = task.criterion(task(batch), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_one_view_missing_still_gives_a_distribution(dm, vit_weights) -> None:
    torch.manual_seed(0)
    task = FusionTask(data_info=dm.info(), net=net(vit_weights, fusion="mbt")).eval()
    batch = next(iter(dm.val_dataloader()))
    no_series = {**batch, "has_series": torch.zeros_like(batch["has_series"])}
    no_image = {**batch, "has_image": torch.zeros_like(batch["has_image"])}
    with torch.no_grad():
        full = task(batch).softmax(-1)
        for missing in (no_series, no_image):
            probs = task(missing).softmax(-1)
            assert torch.isfinite(probs).all()
            assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))
            assert not torch.allclose(probs, full)  # the missing view really is replaced
        # A missing series is never read: its values do not matter.
        scrambled = {**no_series, "series": torch.randn_like(batch["series"]) * 50}
        assert torch.allclose(task(scrambled), task(no_series))


def test_modality_dropout_hides_exactly_one_view(dm, vit_weights) -> None:
    task = FusionTask(data_info=dm.info(), net=net(vit_weights), modality_dropout=1.0)
    batch = next(iter(dm.train_dataloader()))
    dropped = task._drop_modalities(batch)
    views = dropped["has_image"].int() + dropped["has_series"].int()
    assert (views == 1).all()
    assert 0 < dropped["has_image"].sum() < len(views)


def test_single_branch_variants_need_no_fusion(dm, vit_weights) -> None:
    series_only = FusionTask(data_info=dm.info(), net={"image": False, "fusion": "none"})
    assert series_only.net.image_encoder is None and not series_only.caches_image_tokens
    with pytest.raises(ValueError, match="needs both branches"):
        FusionTask(data_info=dm.info(), net={"image": False, "fusion": "mbt"})


def test_cli_fit_then_test_end_to_end(trained_run: TrainedRun, small_manifest: Path) -> None:
    saved = torch.load(trained_run.ckpt, weights_only=True, map_location="cpu")  # data only
    info = saved["hyper_parameters"]["data_info"]
    assert info["classes"] == sorted(pd.read_csv(small_manifest)["label"].unique())
    assert len(info["band_stats"]["mean"]) == 3 and info["hours"] == 672
    assert saved["hyper_parameters"]["net"]["fusion"] == "mbt"
    assert list(trained_run.cache.glob("vit-tokens-*.npz"))  # frozen ViT tokens cached
    # A temperature was fitted on the val rows and saved with the weights.
    temperature = float(saved["state_dict"]["temperature"])
    assert 0.05 <= temperature <= 20 and temperature != 1.0
    assert (trained_run.root / "confusion_test.png").is_file()
    predictions = pd.read_csv(trained_run.root / "predictions_test.csv")
    assert len(predictions) == 6 * 4  # the test rows
    probs = predictions.filter(like="p_").to_numpy()
    assert probs.shape[1] == 6 and abs(probs.sum(axis=1) - 1).max() < 1e-5


class Payload:
    """Unpickling this would run code: a checkpoint holding it must be refused."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_cli_refuses_checkpoints_with_pickled_code(
    small_manifest: Path, shared_data: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload()}}, bad)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        main(["test", "--config", "configs/bilstm.yaml", "--ckpt_path", str(bad),
              "--data.manifest", str(small_manifest), "--data.split", "manifest",
              "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
              "--data.cache_dir", str(tmp_path), "--trainer.logger", "false"])  # fmt: skip
    assert "pickled code ran" not in capsys.readouterr().out


def test_computing_image_tokens_leaves_the_global_rng_alone(dm, vit_weights) -> None:
    task = FusionTask(data_info=dm.info(), net=net(vit_weights))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tokens = task._encode_all(dm)
    assert tokens.shape == (len(dm.dataset("all")), 1 + 2 * 2, 384)
    assert torch.equal(torch.rand(3), expected)


class RowsSeen(L.Callback):
    """Manifest rows of every training and validation batch."""

    def __init__(self) -> None:
        self.train: set[int] = set()
        self.val: set[int] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.train.update(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.update(batch["index"].tolist())


def test_the_held_out_fold_never_reaches_selection_or_the_temperature(
    places_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path: Path
) -> None:
    dm = FusionDataModule(
        manifest=str(places_manifest),
        series=str(shared_data / "footfall" / "counts.csv.gz"),
        split="place",
        groups=str(shared_data / "footfall" / "sensors.csv"),
        val_fraction=0.25,
        folds=3,
        fold=1,
        image_size=IMAGE_SIZE,
        batch_size=32,
        cache_dir=str(tmp_path),
    )
    dm.setup()
    torch.manual_seed(0)
    task = FusionTask(data_info=dm.info(), net=net(vit_weights), cache_dir=str(tmp_path))
    seen = RowsSeen()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/macro_f1", mode="max")
    trainer = L.Trainer(
        max_epochs=2, callbacks=[seen, best], logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, dm)
    test_rows = set(np.flatnonzero(dm.splits == "test").tolist())
    assert test_rows and seen.train and best.best_model_score is not None
    # The checkpoint is chosen and the temperature fitted on the val rows alone.
    assert seen.val == set(np.flatnonzero(dm.splits == "val").tolist())
    assert not (seen.train | seen.val) & test_rows
    task.eval()
    with torch.no_grad():
        batches = list(dm.val_dataloader())
        logits = torch.cat([task(b) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert calibrate(logits, labels).temperature == pytest.approx(task.temperature.item(), rel=1e-4)
