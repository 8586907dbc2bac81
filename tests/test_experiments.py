"""``fusion ablate`` / ``compare`` / ``report`` end to end on a slice of the real benchmark."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import multiclass_f1_score

from fusion import cli as cli_module
from fusion.cli import main
from fusion.experiments import bootstrap_difference, macro_f1


@pytest.fixture(scope="module")
def overrides(small_manifest, shared_data, vit_weights, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return [
        "--data.manifest", str(small_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.split", "manifest",
        "--data.image_size", "56",
        "--data.cache_dir", str(cache),
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--model.cache_dir", str(cache),
        "--trainer.max_epochs", "1",
    ]  # fmt: skip


def test_ablate_writes_tables_and_plot_and_resumes(overrides, tmp_path, monkeypatch) -> None:
    out = tmp_path / "ablation"
    argv = ["ablate", "--config", "configs/mbt_mid.yaml", "--depths", "early", "late",
            "--seeds", "2", "--output", str(out), "--", *overrides]  # fmt: skip
    assert main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results["depth"]) == ["early", "early", "late", "late"]
    assert list(results["seed"]) == [0, 1, 0, 1]
    assert list(results["fusion_layer"]) == [0, 0, 4, 4]
    assert results["OA"].between(0, 1).all() and (results["train_seconds"] > 0).all()
    assert {"macro_f1", "kappa", "f1_park", "parameters", "inference_samples_per_s"} <= set(
        results.columns
    )
    summary = (out / "summary.md").read_text()
    assert "| early |" in summary and "±" in summary
    assert (out / "ablation.png").stat().st_size > 10_000
    assert not list(out.glob("runs/*/checkpoints"))  # tested runs keep no checkpoints

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cli_module, "build_cli", no_training)
    assert main(argv) == 0  # everything resumes from result.json
    assert pd.read_csv(out / "results.csv").equals(results)


def test_compare_against_the_baseline_and_report(overrides, tmp_path) -> None:
    out = tmp_path / "compare"
    argv = ["compare", "--configs", "concat", "vit", "--seeds", "2", "--output", str(out),
            "--", *overrides]  # fmt: skip
    assert main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results["model"]) == ["bilstm"] * 2 + ["concat"] * 2 + ["vit"] * 2
    summary = (out / "summary.md").read_text()
    assert "Against the bilstm baseline" in summary and "| concat |" in summary
    run = json.loads((out / "runs" / "concat-seed1" / "result.json").read_text())
    assert np.array(run["confusion"]).sum() == run["test_samples"] == 24
    for image in ("compare.png", "confusion.png"):
        assert (out / image).stat().st_size > 10_000
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    for _ in range(2):  # writing twice replaces the section, never duplicates it
        assert main(["report", "--compare", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.count("## Results") == 1 and "paired by label only" in text
    assert "](compare/compare.png)" in text and text.startswith("# project")


def test_macro_f1_matches_torchmetrics() -> None:
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    preds[preds == 4] = 3  # a class never predicted
    expected = multiclass_f1_score(
        torch.tensor(preds), torch.tensor(labels), num_classes=6, average="macro"
    )  # class 5 never occurs at all: ignored by both
    assert macro_f1(labels, preds, 6) == pytest.approx(float(expected))


def test_bootstrap_interval() -> None:
    classes = ["a", "b"]
    rows = np.arange(100)
    labels = np.where(rows % 2 == 0, "a", "b")
    truth = pd.DataFrame({"row": rows, "label": labels, "pred": labels})
    wrong = truth.assign(pred=np.where(rows < 30, np.where(labels == "a", "b", "a"), labels))
    assert bootstrap_difference([truth], [truth], classes, n_boot=50) == (0.0, 0.0, 0.0)
    mean, low, high = bootstrap_difference([truth], [wrong], classes, n_boot=200)
    assert mean == pytest.approx(0.3, abs=0.01) and 0 < low < mean < high
