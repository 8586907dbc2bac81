"""Inference options of the frozen ViT (``fusion predict --speed``): each changes what it says,
the model's weights stay those trained, and the predictions stay close to the exact ones."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from fusion.cli import main
from fusion.predict import load_model
from fusion.speed import EXACT, PRESETS, Speed, apply_speed, parse_speed


def test_names_and_precision() -> None:
    assert EXACT.name == "exact" and EXACT.precision == "32-true"
    assert Speed(merge=8, int8=True).name == "tome8+int8"
    assert Speed(bf16=True).precision == "bf16-mixed"
    assert PRESETS["exact"] == EXACT and PRESETS["fast"] != EXACT


def test_int8_and_merge_change_only_the_frozen_vit(trained_run) -> None:
    task, _ = load_model(trained_run.ckpt)
    heads = {k: v.clone() for k, v in task.net.state_dict().items() if "image_encoder" not in k}
    apply_speed(task.net, Speed(merge=2, int8=True), "cpu")
    backbone = task.net.image_encoder.backbone
    assert task.net.image_encoder.merge == 2
    assert not any(type(m) is nn.Linear for m in backbone.modules())  # all quantised
    quantised = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, quantised) for m in backbone.modules()) == 4 * len(backbone.blocks)
    after = task.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in heads.items())  # the rest untouched
    apply_speed(task.net, Speed(merge=2, int8=True), "cpu")  # again: nothing more happens
    assert sum(isinstance(m, quantised) for m in backbone.modules()) == 4 * len(backbone.blocks)


def test_refused_where_it_cannot_run(trained_run) -> None:
    task, _ = load_model(trained_run.ckpt)
    with pytest.raises(ValueError, match="CPU only"):
        apply_speed(task.net, Speed(int8=True), "gpu")
    with pytest.raises(ValueError, match=">= 0"):
        apply_speed(task.net, Speed(merge=-1), "cpu")
    task.net.image_encoder = None
    with pytest.raises(ValueError, match="no image branch"):
        apply_speed(task.net, Speed(merge=4), "cpu")
    apply_speed(task.net, Speed(bf16=True), "cpu")  # the trainer's precision: any model


def test_predict_with_each_option(
    trained_run, small_manifest: Path, shared_data: Path, tmp_path: Path
) -> None:
    series_path = shared_data / "footfall" / "counts.csv.gz"
    common = ["predict", "--ckpt_path", str(trained_run.ckpt), "--manifest", str(small_manifest),
              "--series", str(series_path), "--device", "cpu"]  # fmt: skip
    runs = {"exact": [], "int8": ["--int8"], "bf16": ["--bf16"],
            "fast": ["--speed", "fast", "--merge", "2"]}  # fmt: skip
    for name, extra in runs.items():
        assert main([*common, *extra, "--output", str(tmp_path / f"{name}.csv")]) == 0
    exact = pd.read_csv(tmp_path / "exact.csv")
    probs = [f"p_{c}" for c in load_model(trained_run.ckpt)[0].classes]
    for name in runs:
        other = pd.read_csv(tmp_path / f"{name}.csv")
        assert (other["sample_id"] == exact["sample_id"]).all()
        assert other[probs].sum(axis=1).sub(1).abs().max() < 1e-3, name
        gap = (other[probs] - exact[probs]).abs().to_numpy().max()
        if name == "exact":
            assert gap == 0
        elif name in ("int8", "bf16"):  # lower precision, same tokens: close
            assert 0 < gap < 0.3 and (other["pred"] == exact["pred"]).mean() >= 0.85, name
        else:  # merging in a 4 x 4-patch test tile removes most of it: only changed
            assert gap > 0, name


def test_parse_speed() -> None:
    assert parse_speed("exact") == EXACT and parse_speed("fast") == PRESETS["fast"]
    assert parse_speed("tome16+int8") == Speed(merge=16, int8=True)
    assert parse_speed("bf16+compile") == Speed(bf16=True, compile=True)
    with pytest.raises(ValueError, match="'fp4'"):
        parse_speed("tome8+fp4")
