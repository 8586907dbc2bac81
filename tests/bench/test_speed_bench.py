"""``fusion bench --parts speed`` on a slice of the real benchmark: fold models trained once,
every setting scored on the same held-out rows and timed through the predict path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusion.bench.speed import bench_setting, fold_models, run_speed_bench
from fusion.configs import config_files
from fusion.errors import InputError
from fusion.speed import parse_speed


def test_speed_bench_end_to_end(places_manifest, shared_data, vit_weights, tmp_path) -> None:
    series = shared_data / "footfall" / "counts.csv.gz"
    overrides = [
        "--data.manifest", str(places_manifest), "--data.series", str(series),
        "--data.image_size", "56", "--data.cache_dir", str(tmp_path / "cache"),
        "--model.net.vit_weights", str(vit_weights), "--model.net.token_grid", "2",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip
    work, out = tmp_path / "work", tmp_path / "out"
    frame = run_speed_bench(
        out, config_files("vit"), series, work, settings=["int8", "tome2", "px28"], folds=2,
        rows=8, rounds=1, overrides=overrides,
    )  # fmt: skip
    assert frame["setting"].tolist() == ["timm_vit", "exact", "int8", "tome2", "px28"]
    assert frame.set_index("setting")["image_size"].get("px28") == 28
    # px28's models: the same folds, trained on 28 px tiles, in their own folder
    small = fold_models(config_files("vit"), 2, work / "px28",
                        [*overrides, "--data.image_size", "28"])  # fmt: skip
    assert [pd.read_csv(m.held_out)["sample_id"].tolist() for m in small] == [
        pd.read_csv(m.held_out)["sample_id"].tolist()
        for m in fold_models(config_files("vit"), 2, work, overrides)
    ]
    assert (frame["samples_per_s"] > 0).all()
    exact = frame.set_index("setting").loc["exact"]
    assert exact["x_exact"] == 1 and exact["macro_f1_points"] == 0
    # Every held-out row of both folds scored once, each fold by the model that never saw it.
    models = fold_models(config_files("vit"), 2, work, overrides)  # reused, not trained again
    held = [pd.read_csv(m.held_out) for m in models]
    assert exact["rows"] == sum(len(h) for h in held) and 0 < exact["macro_f1"] <= 1
    assert not set(held[0]["sensor_id"]) & set(held[1]["sensor_id"])
    assert np.isfinite(frame["macro_f1"].iloc[1:]).all()
    assert (out / "speed.png").stat().st_size > 10_000
    text = (out / "speed.md").read_text()
    assert "| tome2 |" in text and "bare timm ViT" in text
    with pytest.raises(InputError, match="use another --work folder"):  # another config's models
        fold_models(config_files("mbt_mid"), 2, work, overrides)


def test_bench_settings_name_a_tile_size_and_prediction_options() -> None:
    assert bench_setting("exact") == (None, parse_speed("exact"))
    assert bench_setting("px168+bf16") == (168, parse_speed("bf16"))
    assert bench_setting("tome8+px140") == (140, parse_speed("tome8"))
    assert bench_setting("px154") == (154, parse_speed("exact"))
    with pytest.raises(ValueError, match="more than one tile size"):
        bench_setting("px140+px168")
    with pytest.raises(ValueError, match="unknown speed setting"):
        bench_setting("px140+fp8")
