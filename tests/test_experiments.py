"""``fusion ablate`` / ``compare`` / ``report`` end to end on a slice of the real benchmark,
judged by place-grouped cross-validation; the cluster bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fusion import experiments
from fusion.cli import main
from fusion.experiments import OOF_FILE, cluster_bootstrap


@pytest.fixture(scope="module")
def overrides(places_manifest, shared_data, vit_weights, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return [
        "--data.manifest", str(places_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.image_size", "56",
        "--data.cache_dir", str(cache),
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--trainer.max_epochs", "1",
    ]  # fmt: skip


def test_compare_predicts_every_row_once_per_repeat_from_unseen_places(
    overrides, places_manifest, shared_data, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "compare"
    argv = ["compare", "--configs", "vit", "linear_probe", "concat", "--folds", "3",
            "--repeats", "2", "--output", str(out), "--", *overrides]  # fmt: skip
    assert main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 * 2 * 3  # (model, repeat, fold)
    assert list(dict.fromkeys(results["setting"])) == ["bilstm", "vit", "linear_probe", "concat"]
    assert set(results.loc[results["setting"] == "linear_probe", "kind"]) == {"linear_probe"}
    concat = results[results["setting"] == "concat"]
    shares = concat[["weight_fused", "weight_image", "weight_series"]].sum(axis=1)
    assert np.allclose(shares, 1.0)  # each run's heads pooled with weights from val places
    assert all(sorted(f) == [0, 1, 2] for _, f in results.groupby(["setting", "repeat"])["fold"])
    assert {"macro_f1", "ece", "token_seconds", "train_seconds", "vit_tokens"} <= set(results)

    manifest = pd.read_csv(places_manifest)
    oof = pd.read_csv(out / OOF_FILE)
    evaluable = manifest.index[manifest["label"] != "park"]  # park: a single place
    for (setting, repeat), part in oof.groupby(["setting", "repeat"]):
        # Every row of an evaluable class, exactly once, by the fold that held its place out.
        assert sorted(part["row"]) == list(evaluable), (setting, repeat)
        assert (part.groupby("group")["fold"].nunique() == 1).all()
    # Conformal sets on the held-out folds, from each fold's inner val places: the trained
    # models have them (the linear probe does not), every set holds the predicted class.
    sets = oof[oof["setting"] == "concat"]
    assert (sets["set_size"] >= 1).all()
    assert all(p in s.split("|") for p, s in zip(sets["pred"], sets["pred_set"], strict=True))
    assert (sets["set_size"] == sets["pred_set"].str.count(r"\|") + 1).all()
    assert oof.loc[oof["setting"] == "linear_probe", "pred_set"].isna().all()
    # Cross-fitted sets (every setting): each fold's from the other folds' held-out rows only.
    classes = sorted(manifest["label"].unique())
    assert oof["set_size_cv"].ge(1).all()
    probe = oof[(oof["setting"] == "linear_probe") & (oof["repeat"] == 1)]
    held = probe["fold"] == 0
    member = experiments.oof_calibration(probe[~held], classes).sets(
        probe.loc[held, [f"p_{c}" for c in classes]].to_numpy(), 0.9
    )
    assert probe.loc[held, "set_size_cv"].tolist() == member.sum(axis=1).tolist()
    # A new repeat deals the places into other folds.
    folds = oof[oof["setting"] == "vit"].pivot(index="row", columns="repeat", values="fold")
    assert (folds[0] != folds[1]).any()

    summary = (out / "summary.md").read_text()
    assert "place-grouped 3-fold cross-validation, 2 repeats" in summary
    assert "Not evaluable on new places: park" in summary
    assert "## Against bilstm" in summary and "## Against vit" in summary
    assert "| vit |" in summary and "| linear_probe |" in summary and "±" in summary
    # The fused model with one view removed, scored on the same rows.
    assert "| concat · image alone |" in summary and "| concat · series alone |" in summary
    assert "Conformal prediction sets at 90% on the held-out places" in summary
    assert "Unfamiliar tiles flagged on the held-out places" in summary
    flags = experiments.flag_table(oof)
    assert set(flags.index) == {"vit", "concat"}  # every trained model has an image head
    assert ((flags["flagged"] >= 0) & (flags["flagged"] <= 1)).all()
    table = experiments.set_coverage(oof, classes)
    inner = table["calibration"] == "inner val places"
    concat_all = table[inner & (table["setting"] == "concat") & (table["true_class"] == "all")]
    hit = [p in s.split("|") for p, s in zip(sets["label"], sets["pred_set"], strict=True)]
    assert concat_all["coverage"].item() == pytest.approx(np.mean(hit))  # equal repeat sizes
    assert f"| concat | inner val places | all | {len(sets) / 2:.0f} | " in summary
    assert f"| linear_probe | other folds | all | {len(sets) / 2:.0f} | " in summary
    for image in ("compare.png", "confusion.png"):
        assert (out / image).stat().st_size > 10_000

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiments, "build_cli", no_training)
    assert main(argv) == 0  # everything resumes from result.json
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)

    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    for _ in range(2):  # writing twice replaces the section, never duplicates it
        assert main(["report", "--compare", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.count("## Results") == 1 and "paired by label only" in text
    assert "](compare/compare.png)" in text and text.startswith("# project")
    assert "place-grouped 3-fold cross-validation" in text


def test_ablate_cross_validates_each_depth(overrides, tmp_path) -> None:
    out = tmp_path / "ablation"
    argv = ["ablate", "--config", "mbt_mid", "--depths", "early", "late",
            "--folds", "2", "--repeats", "1", "--output", str(out), "--", *overrides]  # fmt: skip
    assert main(argv) == 0
    results = pd.read_csv(out / "results.csv")
    assert list(results["setting"]) == ["early", "early", "late", "late"]
    assert list(results["fusion_layer"]) == [0, 0, 4, 4]
    assert results["OA"].between(0, 1).all() and (results["train_seconds"] > 0).all()
    run = json.loads((out / "runs" / "late" / "repeat0-fold1" / "result.json").read_text())
    assert np.array(run["confusion"]).sum() == run["test_rows"] > 0
    assert (out / "ablation.png").stat().st_size > 10_000
    assert not list(out.glob("runs/*/*/checkpoints"))  # tested runs keep no checkpoints
    assert not list(out.glob("runs/*/*/predictions_test.csv"))  # nor copies of predictions


def test_cluster_bootstrap_resamples_places_not_rows() -> None:
    # 2 classes x 6 places x 40 rows. The model is right on every row of 4 places per class and
    # wrong on every row of the other 2; the reference is always right. Rows of one place are
    # perfectly correlated, so resampling rows understates the uncertainty.
    places = np.repeat(np.arange(12), 40)
    labels = (places >= 6).astype(int)
    model = np.where(places % 6 < 4, labels, 1 - labels)
    by_place = cluster_bootstrap(labels, places, [model], [labels], 2, n_boot=400)
    by_row = cluster_bootstrap(labels, np.arange(len(labels)), [model], [labels], 2, n_boot=400)
    assert by_place[0] == by_row[0] == pytest.approx(2 / 3 - 1)  # same observed difference
    width_place, width_row = by_place[2] - by_place[1], by_row[2] - by_row[1]
    assert width_place > 3 * width_row, (width_place, width_row)
    assert by_place[1] < by_place[0] < by_place[2] <= 0
    # A model equal to its reference differs by exactly 0 in every resample.
    assert cluster_bootstrap(labels, places, [labels], [labels], 2, n_boot=50) == (0.0, 0.0, 0.0)


def test_calibrate_puts_a_cross_validation_s_sets_in_a_checkpoint(
    trained_run, small_manifest, tmp_path
) -> None:
    from fusion.predict import load_model, read_checkpoint

    task, _ = load_model(trained_run.ckpt)
    classes = list(task.classes)
    rng = np.random.default_rng(0)
    manifest = pd.read_csv(small_manifest)
    probs = rng.dirichlet(np.ones(len(classes)), size=len(manifest))
    oof = pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])
    oof["label"], oof["group"] = manifest["label"], manifest["sensor_id"]
    oof["setting"] = "mine"
    other = oof.assign(setting="other", label=classes[0])  # a setting that must be left out
    path = tmp_path / "oof.csv.gz"
    pd.concat([oof, other]).to_csv(path, index=False)
    out = tmp_path / "calibrated.ckpt"
    argv = ["calibrate", "--ckpt_path", str(trained_run.ckpt), "--oof", str(path)]
    assert main([*argv, "--setting", "mine", "--output", str(out)]) == 0
    calibrated, _ = load_model(out)
    expected = experiments.oof_calibration(oof, classes)
    assert calibrated.conformal.n_places == manifest["sensor_id"].nunique()
    np.testing.assert_array_equal(calibrated.conformal.thresholds(0.9), expected.thresholds(0.9))
    assert not np.array_equal(  # the val places' calibration is replaced, not kept
        calibrated.conformal.thresholds(0.9), task.conformal.thresholds(0.9)
    )
    before, after = read_checkpoint(trained_run.ckpt), read_checkpoint(out)
    assert before["state_dict"].keys() == after["state_dict"].keys()
    assert all(torch.equal(v, after["state_dict"][k]) for k, v in before["state_dict"].items())
    # A setting not in the file, or a label not among the model's classes: nothing written.
    assert main([*argv, "--setting", "nope", "--output", str(tmp_path / "a.ckpt")]) == 2
    oof.assign(label="airport").to_csv(path, index=False)
    assert main([*argv, "--setting", "mine", "--output", str(tmp_path / "b.ckpt")]) == 2
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()
