"""The fusion task on a small slice of the real benchmark: training, missing views, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from fusion.calibration import fit_view_weights
from fusion.cli import main
from fusion.data.datamodule import FusionDataModule
from fusion.data.tokens import encode_tiles
from fusion.task import FusionTask
from fusion.training import build_cli
from tests.conftest import IMAGE_SIZE, TrainedRun, config


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
    task = FusionTask(
        data_info=dm.contract().to_dict(), net=net(vit_weights, fusion=fusion), lr=3e-3
    )
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
    task = FusionTask(data_info=dm.contract().to_dict(), net=net(vit_weights, fusion="mbt")).eval()
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


def test_modality_dropout_hides_exactly_one_view_from_the_fusion_only(dm, vit_weights) -> None:
    task = FusionTask(
        data_info=dm.contract().to_dict(), net=net(vit_weights, experts=True), modality_dropout=1.0
    ).eval()
    batch = next(iter(dm.train_dataloader()))
    hidden = task._drop_modalities(batch)
    views = (~hidden["hide_image"]).int() + (~hidden["hide_series"]).int()
    assert (views == 1).all()
    assert 0 < hidden["hide_image"].sum() < len(views)
    with torch.no_grad():
        dropped = task.net.heads(**task._inputs(batch), **hidden)
        full = task.net.heads(**task._inputs(batch))
    # The experts read their view whatever the fusion was shown; the fusion did lose a view.
    assert torch.allclose(dropped["image"], full["image"])
    assert torch.allclose(dropped["series"], full["series"])
    assert not torch.allclose(dropped["fused"], full["fused"])


def test_single_branch_variants_need_no_fusion(dm, vit_weights) -> None:
    series_only = FusionTask(
        data_info=dm.contract().to_dict(), net={"image": False, "fusion": "none"}
    )
    assert series_only.net.image_encoder is None and not series_only.caches_image_tokens
    with pytest.raises(ValueError, match="needs both branches"):
        FusionTask(data_info=dm.contract().to_dict(), net={"image": False, "fusion": "mbt"})


def test_cli_fit_then_test_end_to_end(trained_run: TrainedRun, small_manifest: Path) -> None:
    saved = torch.load(trained_run.ckpt, weights_only=True, map_location="cpu")  # data only
    info = saved["hyper_parameters"]["data_info"]
    assert info["classes"] == sorted(pd.read_csv(small_manifest)["label"].unique())
    assert len(info["band_stats"]["mean"]) == 3 and info["hours"] == 672
    assert saved["hyper_parameters"]["net"]["fusion"] == "mbt"
    assert list(trained_run.cache.glob("vit-tokens-*/tokens.npy"))  # frozen ViT tokens cached
    # A temperature was fitted on the val rows and saved with the weights.
    temperature = float(saved["state_dict"]["temperature"])
    assert 0.05 <= temperature <= 20 and temperature != 1.0
    assert (trained_run.root / "confusion_test.png").is_file()
    predictions = pd.read_csv(trained_run.root / "predictions_test.csv")
    assert len(predictions) == 6 * 4  # the test rows
    for prefix in ("p_", "p_image_", "p_series_"):  # the fused output, then each view alone
        names = [f"{prefix}{c}" for c in info["classes"]]
        probs = predictions[names].to_numpy()
        assert abs(probs.sum(axis=1) - 1).max() < 1e-5


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
        main(["test", *config("bilstm"), "--ckpt_path", str(bad),
              "--data.manifest", str(small_manifest), "--data.split", "manifest",
              "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
              "--data.cache_dir", str(tmp_path), "--trainer.logger", "false"])  # fmt: skip
    assert "pickled code ran" not in capsys.readouterr().out


def test_computing_image_tokens_leaves_the_global_rng_alone(dm, vit_weights) -> None:
    task = FusionTask(data_info=dm.contract().to_dict(), net=net(vit_weights))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tokens = encode_tiles(dm.dataset("all"), task.net.image_encoder.frozen_part)
    assert tokens.shape == (len(dm.dataset("all")), 1 + 2 * 2, 384)
    assert torch.equal(torch.rand(3), expected)


def _refit_argv(variant: str, data: list[str], vit_weights: Path, tmp_path: Path) -> list[str]:
    """``fusion fit --refit true`` of ``variant`` on ``data`` settings, small and quick: every
    stage's train/val rows and head weights recorded to ``tmp_path/rows.jsonl``, checkpoints in
    ``tmp_path/checkpoints``, the token cache in ``tmp_path/cache``."""
    return [
        "fit", *config(variant), "--refit", "true", *data,
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--trainer.max_epochs", "2",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=tests.callbacks.RecordRows",
        "--trainer.callbacks.path", str(tmp_path / "rows.jsonl"),
    ]  # fmt: skip


def test_heads_are_weighed_on_held_out_places_and_the_refit_trains_on_all_but_the_test_fold(
    places_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path: Path
) -> None:
    record, cache = tmp_path / "rows.jsonl", tmp_path / "cache"
    data = [
        "--data.manifest", str(places_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.folds", "3", "--data.fold", "1",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.cache_dir", str(cache),
    ]  # fmt: skip
    assert main(_refit_argv("mbt_mid", data, vit_weights, tmp_path)) == 0
    stage1, stage2 = (json.loads(line) for line in record.read_text().splitlines())
    # The same folds and inner split as the run's, rebuilt from its settings.
    cli = build_cli([*config("mbt_mid"), *data], run=False)
    dm = cli.datamodule
    rows = {n: set(np.flatnonzero(dm.splits == n).tolist()) for n in ("train", "val", "test")}
    assert (
        rows["test"] and set(stage1["val"]) == rows["val"] and set(stage1["train"]) == rows["train"]
    )
    # Stage 2 trains on every place of stage 1, never on the held-out fold, and keeps the
    # weights stage 1 fitted on its val places.
    assert set(stage2["train"]) == rows["train"] | rows["val"] and not stage2["val"]
    assert stage2["weights"] == stage1["weights"] and stage2["temperature"] == stage1["temperature"]
    final = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu"
    )
    assert final["state_dict"]["net.view_weights"].tolist() == stage1["weights"]
    # Those weights are what the val rows' heads ask for: refitting them there gives them back.
    task = FusionTask.load_from_checkpoint(
        tmp_path / "checkpoints" / "heldout" / "last.ckpt", weights_only=True, map_location="cpu"
    ).eval()
    heads, labels = task.held_out_heads(dm.val_dataloader())
    weights = torch.tensor(fit_view_weights(heads.unbind(dim=1), labels))
    assert (weights / weights.sum()).tolist() == pytest.approx(stage1["weights"], rel=1e-4)
    assert 1 / float(weights.sum()) == pytest.approx(stage1["temperature"], rel=1e-4)


def test_cross_fitted_weights_come_from_models_that_never_saw_the_rows_places(
    places_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path: Path
) -> None:
    record, cache = tmp_path / "rows.jsonl", tmp_path / "cache"
    data = [
        "--data.manifest", str(places_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.folds", "3", "--data.fold", "0", "--data.inner_folds", "2",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.cache_dir", str(cache),
    ]  # fmt: skip
    assert main(_refit_argv("concat", data, vit_weights, tmp_path)) == 0
    first, second, final = (json.loads(line) for line in record.read_text().splitlines())
    dms = [build_cli([*config("concat"), *data, "--data.inner_fold", str(k)],
                     run=False).datamodule for k in (0, 1)]  # fmt: skip
    test = set(np.flatnonzero(dms[0].splits == "test").tolist())
    # Each inner model is scored on places it never trained on; together they score every
    # training place once; the final model trains on them all and never on the test fold.
    for inner, dm in zip((first, second), dms, strict=True):
        assert set(inner["val"]) == set(np.flatnonzero(dm.splits == "val").tolist())
        assert not set(dm.groups[inner["val"]]) & set(dm.groups[inner["train"]])
    assert not set(first["val"]) & set(second["val"])
    trained = set(final["train"])
    assert set(first["val"]) | set(second["val"]) <= trained and not trained & test
    # The final weights are those the val rows of both inner models ask for.
    heads, labels = [], []
    for path, dm in zip(("last.ckpt", "inner1/last.ckpt"), dms, strict=True):
        task = FusionTask.load_from_checkpoint(
            tmp_path / "checkpoints" / "heldout" / path, weights_only=True, map_location="cpu"
        )
        h, y = task.held_out_heads(dm.val_dataloader())
        heads.append(h)
        labels.append(y)
    weights = torch.tensor(fit_view_weights(torch.cat(heads).unbind(dim=1), torch.cat(labels)))
    assert final["weights"] == pytest.approx((weights / weights.sum()).tolist(), rel=1e-4)
    assert final["temperature"] == pytest.approx(1 / float(weights.sum()), rel=1e-4)
