"""``fusion explain``: which view moved each prediction (hand-made tables with known answers, the
real output of ``fusion test``) and one sample's saliency maps from a real trained model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from fusion.cli import main
from fusion.errors import InputError
from fusion.explain import (
    class_report,
    explain_rows,
    prediction_classes,
    view_scores,
    write_explanation,
)
from fusion.predict import load_model
from fusion.saliency import saliency, sample_saliency, write_saliency
from tests.conftest import TrainedRun

NAN = float("nan")
CLASSES = ["A", "B", "C"]
# Per row: label, fused, image alone, series alone (probabilities of A, B, C; None = view missing).
ROWS = [
    ("A", (0.85, 0.10, 0.05), (0.9, 0.05, 0.05), (0.2, 0.8, 0.0)),  # image says A, series B
    ("B", (0.05, 0.9, 0.05), (0.2, 0.7, 0.1), (0.3, 0.6, 0.1)),  # both say B
    ("A", (0.25, 0.7, 0.05), (0.6, 0.3, 0.1), (0.05, 0.9, 0.05)),  # follows the series, wrong
    ("B", (0.2, 0.6, 0.2), (0.5, 0.3, 0.2), (0.1, 0.4, 0.5)),  # neither view says B
    ("A", (0.8, 0.1, 0.1), (0.8, 0.1, 0.1), None),  # no series
    ("", (0.1, 0.2, 0.7), None, (0.1, 0.2, 0.7)),  # no image, no label
    ("C", None, None, None),  # skipped
    ("B", (0.6, 0.3, 0.1), (0.7, 0.2, 0.1), (0.3, 0.6, 0.1)),  # follows the image, wrong
]


def table(rows=ROWS, labels: bool = True) -> pd.DataFrame:
    """A predictions table as ``fusion predict`` / ``fusion test`` write it."""
    records = []
    for i, (label, *views) in enumerate(rows):
        record: dict[str, object] = {"sample_id": f"s{i}"}
        if labels:
            record["label"] = label or NAN
        for prefix, p in zip(("", "image_", "series_"), views, strict=True):
            name = f"pred_{prefix}".rstrip("_")
            record[name] = CLASSES[int(np.argmax(p))] if p is not None else NAN
            for k, c in enumerate(CLASSES):
                record[f"p_{prefix}{c}"] = p[k] if p is not None else NAN
        records.append(record)
    return pd.DataFrame.from_records(records)


def test_each_row_says_which_view_moved_the_prediction() -> None:
    out = explain_rows(table(), CLASSES)
    assert out["view_agree"].tolist() == [
        "image", "both", "series", "neither", "image only", "series only", "", "image",
    ]  # fmt: skip
    drivers = ["image", "both", "series", "-", "image", "series", "", "image"]
    assert out["driver"].tolist() == drivers
    # Row 0: image says A with 0.9, series says B with 0.8 (A 0.2), fused A with 0.85.
    row = out.iloc[0]
    assert (row["fused_p"], row["image_p"], row["series_p"]) == (0.85, 0.9, 0.2)
    assert row["moved_by_image"] == pytest.approx(math.log(0.85 / 0.2))  # pushed towards A
    assert row["moved_by_series"] == pytest.approx(math.log(0.85 / 0.9))  # pulled away, outweighed
    assert row["moved_by_series"] < 0 < row["moved_by_image"]
    # Row 2 follows the series: adding the image pulled B down from 0.9 to 0.7.
    assert out.loc[2, "moved_by_image"] == pytest.approx(math.log(0.7 / 0.9))
    assert out.loc[2, "moved_by_series"] == pytest.approx(math.log(0.7 / 0.3))
    # Missing views moved nothing; a view alone has no other-view baseline.
    assert out.loc[4, "moved_by_series"] == 0.0 and np.isnan(out.loc[4, "moved_by_image"])
    assert out.loc[5, "moved_by_image"] == 0.0 and np.isnan(out.loc[5, "moved_by_series"])
    assert np.isnan(out.loc[4, "series_p"]) and out.loc[4, "image_p"] == 0.8
    assert out.loc[6, ["fused_p", "moved_by_image", "moved_by_series"]].isna().all()
    # The input columns come first, unchanged; explaining twice replaces the added columns.
    assert out.columns[: len(table().columns)].tolist() == table().columns.tolist()
    again = explain_rows(out, CLASSES)
    assert again.columns.tolist() == out.columns.tolist()
    pd.testing.assert_frame_equal(again, out)


def test_a_zero_probability_gives_a_finite_contribution() -> None:
    rows = [("B", (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))]
    out = explain_rows(table(rows), CLASSES)
    assert out.loc[0, "moved_by_series"] == pytest.approx(-math.log(1e-12))
    assert out.loc[0, "driver"] == "series"


def test_per_class_report_by_fused_class() -> None:
    report = class_report(explain_rows(table(), CLASSES), CLASSES, by="pred").set_index("pred")
    assert report.index.tolist() == ["A", "B", "C", "all"]
    counts = ["rows", "one_view", "both_views", "views_agree", "views_disagree", "follows_image",
              "follows_series", "follows_neither", "labelled"]  # fmt: skip
    assert report.loc["A", counts].tolist() == [3, 1, 2, 0, 2, 2, 0, 0, 3]
    assert report.loc["B", counts].tolist() == [3, 0, 3, 1, 2, 0, 1, 1, 3]
    assert report.loc["C", counts].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert report.loc["all", counts].tolist() == [7, 2, 5, 1, 4, 2, 1, 1, 6]
    assert report.loc["B", "agree_share"] == pytest.approx(1 / 3)
    assert np.isnan(report.loc["C", "agree_share"])
    # A: follows the image twice, right once (row 0) and wrong once (row 7).
    assert report.loc["A", "right_following_image"] == 0.5
    assert np.isnan(report.loc["A", "right_following_series"])
    assert report.loc["A", "image_right_on_disagree"] == 0.5
    assert report.loc["A", "series_right_on_disagree"] == 0.5
    assert report.loc["B", "right_when_agree"] == 1.0
    assert report.loc["B", "right_following_series"] == 0.0
    assert report.loc["B", "right_following_neither"] == 1.0
    total = report.loc["all"]
    assert total["right_following_image"] == 0.5 and total["right_following_series"] == 0.0
    assert total["image_right_on_disagree"] == 0.5 and total["series_right_on_disagree"] == 0.25


def test_per_class_report_by_true_class() -> None:
    report = class_report(explain_rows(table(), CLASSES), CLASSES, by="label").set_index("label")
    # Rows without a label (row 5) or without a prediction (row 6, label C) are left out.
    assert report["rows"].tolist() == [3, 3, 0, 6]
    assert report.loc["A", ["follows_image", "follows_series"]].tolist() == [1, 1]
    assert report.loc["A", "right_following_image"] == 1.0
    assert report.loc["A", "right_following_series"] == 0.0
    b = report.loc["B"]
    assert [b["views_agree"], b["follows_image"], b["follows_neither"]] == [1, 1, 1]
    assert report.loc["B", "right_following_image"] == 0.0


def test_without_labels_the_report_gives_agreement_only() -> None:
    rows = explain_rows(table(labels=False), CLASSES)
    report = class_report(rows, CLASSES)
    assert "labelled" not in report.columns and "right_when_agree" not in report.columns
    assert report["views_agree"].tolist() == [0, 1, 0, 1]
    assert view_scores(rows, CLASSES) == {}
    with pytest.raises(InputError, match="labels"):
        class_report(rows, CLASSES, by="label")


def test_view_scores_use_the_labelled_rows_with_both_views() -> None:
    found = view_scores(explain_rows(table(), CLASSES), CLASSES)
    # Rows 0, 1, 2, 3, 7: fused A B B B A against A B A B B.
    assert found["fused"]["n"] == 5 and found["fused"]["OA"] == pytest.approx(0.6)
    assert found["fused"]["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert found["image alone"]["OA"] == pytest.approx(0.6)
    assert found["series alone"]["OA"] == pytest.approx(0.4)  # B B B C B


def test_explain_command_writes_the_four_outputs(tmp_path: Path, capsys) -> None:
    preds = tmp_path / "preds.csv"
    table().to_csv(preds, index=False)
    out = tmp_path / "out"
    assert main(["explain", "--predictions", str(preds), "--output", str(out)]) == 0
    assert "driver image: 3, series: 2, both: 1, -: 1" in capsys.readouterr().out
    rows = pd.read_csv(out / "explain.csv", keep_default_na=False)
    assert len(rows) == len(ROWS) and rows["sample_id"].tolist() == table()["sample_id"].tolist()
    assert rows["driver"].tolist() == ["image", "both", "series", "-", "image", "series", "",
                                       "image"]  # fmt: skip
    report = pd.read_csv(out / "report.csv")
    assert report["pred"].tolist() == ["A", "B", "C", "all"]
    assert report["follows_image"].tolist() == [2, 0, 0, 2]
    markdown = (out / "report.md").read_text()
    assert "Rows: **fused predicted class**" in markdown
    assert "| A | 3 | 1 | 0 / 2 (0%) | 2 / 2 (100%) |" in markdown
    assert "| fused | 0.600 | 0.583 |" in markdown
    with Image.open(out / "views.png") as image:
        assert image.size[0] > 800 and image.size[1] > 200
    assert sorted(p.name for p in out.iterdir()) == [
        "explain.csv",
        "report.csv",
        "report.md",
        "views.png",
    ]  # fmt: skip  (no temporary file left)
    # By true class, into another folder.
    other = tmp_path / "by_label"
    assert main(["explain", "--predictions", str(preds), "--output", str(other), "--by",
                 "label"]) == 0  # fmt: skip
    assert "Rows: **true class**" in (other / "report.md").read_text()


def test_explain_without_labels_reports_agreement_only(tmp_path: Path) -> None:
    preds = tmp_path / "preds.csv"
    table(labels=False).to_csv(preds, index=False)
    done = write_explanation(preds, tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "No labels: agreement only." in markdown and "right:" not in markdown
    assert "right_when_agree" not in done.report.columns


def views(frame: pd.DataFrame, *parts: str) -> list[str]:
    """The columns of ``frame`` whose name holds one of ``parts``."""
    return [c for c in frame.columns if any(p in c for p in parts)]


@pytest.mark.parametrize(
    ("change", "column"),
    [
        (lambda f: f.drop(columns="p_series_B"), "p_series_B"),
        (lambda f: f.drop(columns="pred_image"), "pred_image"),
        (lambda f: f.drop(columns="pred"), "pred"),
        # A model of one view: no per-view columns at all, or empty ones (as experiments write).
        (lambda f: f.drop(columns=views(f, "image", "series")), "pred_image"),
        (lambda f: f.drop(columns=views(f, "p_image_")), "p_image_<class>"),
        (lambda f: f.assign(**dict.fromkeys(views(f, "p_image", "p_series"), NAN)), "p_image_A"),
        (lambda f: f.assign(p_image_A="high"), "p_image_A"),
        (lambda f: f.assign(pred_series=["Z", *f["pred_series"][1:]]), "pred_series"),
    ],
)
def test_bad_tables_are_one_line_errors_and_write_nothing(
    change, column: str, tmp_path: Path, capsys
) -> None:
    good = tmp_path / "good.csv"
    table().to_csv(good, index=False)
    out = tmp_path / "out"
    assert main(["explain", "--predictions", str(good), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    change(table()).to_csv(bad, index=False)
    assert main(["explain", "--predictions", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err.replace("\n", "") and f"column '{column}'" in err
    assert "Traceback" not in err
    # The earlier outputs are untouched, and nothing else was written.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_other_input_problems(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.csv"
    assert main(["explain", "--predictions", str(missing), "--output", str(tmp_path / "o")]) == 2
    assert "predictions file not found" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.csv"
    table(labels=False).to_csv(unlabelled, index=False)
    argv = ["explain", "--predictions", str(unlabelled), "--output", str(tmp_path / "o")]
    assert main([*argv, "--by", "label"]) == 2
    assert "column 'label'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # neither a table nor a sample
        main(["explain", "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # a sample needs all three
        main(["explain", "--ckpt_path", "m.ckpt", "--output", str(tmp_path / "o")])
    frame = table()
    with pytest.raises(InputError, match=r"line 4.*column 'label'"):
        prediction_classes(frame.assign(label=[*frame["label"][:2], "Z", *frame["label"][3:]]))


# ---------------------------------------------------------------------------------- real model


def test_explain_reads_what_fusion_test_writes(trained_run: TrainedRun, tmp_path: Path) -> None:
    done = write_explanation(trained_run.root / "predictions_test.csv", tmp_path, by="label")
    rows = done.rows
    assert len(rows) == 24 and set(rows["driver"]) <= {"image", "series", "both", "-"}
    assert set(rows["view_agree"]) <= {"both", "image", "series", "neither"}
    both = rows["view_agree"] == "both"
    assert (rows.loc[both, "pred_image"] == rows.loc[both, "pred_series"]).all()
    assert np.isfinite(rows[["moved_by_image", "moved_by_series"]].to_numpy()).all()
    total = done.report.set_index("label").loc["all"]
    assert total["rows"] == 24 and total["views_agree"] + total["views_disagree"] == 24
    assert (
        total["follows_image"] + total["follows_series"] + total["follows_neither"]
        == total["views_disagree"]
    )


@pytest.fixture(scope="module")
def test_rows(small_manifest: Path) -> pd.DataFrame:
    frame = pd.read_csv(small_manifest, dtype=str, keep_default_na=False)
    return frame[frame["split"] == "test"]


def test_saliency_of_one_sample(
    trained_run: TrainedRun, small_manifest: Path, shared_data: Path, test_rows: pd.DataFrame,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Maps of the right shapes, finite, not all zero; the fused output is predict's; both maps
    are gradients x inputs of the fused output (finite differences agree); a missing view has
    no map and its panel says so."""
    series_path = shared_data / "footfall" / "counts.csv.gz"
    sample_id = test_rows["sample_id"].iloc[0]
    result = sample_saliency(trained_run.ckpt, small_manifest, sample_id, series=series_path)
    task, contract = load_model(trained_run.ckpt)
    assert result.patches is not None and result.hours is not None
    assert result.patches.shape == task.net.image_encoder.grid == (4, 4)  # 56 px / 14 px
    assert result.prefix.shape == (1,)
    assert result.hours.shape == (contract.hours,) and result.days.shape == (contract.hours // 24,)
    assert result.series.shape == (contract.hours, len(contract.value_columns))
    assert result.tile.shape == (3, 56, 56)
    for values in (result.patches, result.prefix, result.hours):
        assert np.isfinite(values).all()
    assert np.abs(result.patches).max() > 0 and np.abs(result.hours).max() > 0
    assert (result.hours[~result.mask] == 0).all()
    assert result.start == pd.Timestamp(test_rows["start"].iloc[0])

    # The fused output is what predict_step gives the sample, read the way predict reads it.
    from fusion.data.prediction import ManifestSamples

    samples = ManifestSamples(small_manifest, contract, series=series_path)
    row = int(np.flatnonzero(samples.frame["sample_id"].to_numpy() == sample_id)[0])
    sample = samples[row]
    with torch.no_grad():
        predicted = task.predict_step(default_collate([sample]))["probs"][0].numpy()
    np.testing.assert_allclose(result.probs, predicted, atol=1e-6)
    assert result.pred == task.classes[int(predicted.argmax())]
    assert task.net.isolate_series  # switched off while differentiating only

    # The local hours and weekdays decoded from the calendar features are the window's.
    assert np.array_equal(result.local_hour, samples.series.hour[row])
    assert np.array_equal(result.weekday, samples.series.dow[row])
    for profile in (result.days, result.by_hour_of_day, result.by_weekday):
        assert profile.sum() == pytest.approx(result.hours.sum(), rel=1e-4, abs=1e-6)

    # The maps are gradients of the fused output: finite differences agree.
    c = int(result.probs.argmax())
    batch = default_collate([sample])

    def log_p(**changed: torch.Tensor) -> float:
        with torch.no_grad():
            probs = task.predict_step({**batch, **changed})["probs"][0]
        return math.log(float(probs[c]))

    # Series: along the gradient (over the hours with a count), log p(c) moves by |gradient|.
    x = result.series[:, 0]
    counted = result.mask & (x != 0)
    gradient = np.where(counted, result.hours / np.where(counted, x, 1), 0)  # (T,)
    norm = float(np.linalg.norm(gradient))
    step = torch.from_numpy((0.2 * gradient / norm).astype(np.float32))
    series = batch["series"]
    up = series.clone()
    up[0, :, 0] += step
    down = series.clone()
    down[0, :, 0] -= step
    assert (log_p(series=up) - log_p(series=down)) / 0.4 == pytest.approx(norm, rel=0.02)
    assert norm > 1e-5  # the check above is not of two zeros
    # Image: scaling the patch token that matters most by 1 +- e moves log p(c) by e x its map.
    encoder = task.net.image_encoder
    with torch.no_grad():
        unpooled = encoder.backbone_tokens(batch["image"])
    j = int(np.abs(result.patches).argmax())
    moved = []
    for factor in (1.2, 0.8):
        scaled = unpooled.clone()
        scaled[0, encoder.num_prefix + j] *= factor
        moved.append(log_p(image_tokens=encoder.pool_tokens(scaled)[0]))
    assert (moved[0] - moved[1]) / 0.4 == pytest.approx(result.patches.flat[j], rel=0.02)

    # Without a series: no series map, and the image map is still there; and the other way.
    no_series = saliency(task, {**sample, "has_series": torch.tensor(False)}, "no_series")
    assert no_series.hours is None and no_series.series is None
    assert no_series.patches is not None and np.abs(no_series.patches).max() > 0
    no_image = saliency(task, {**sample, "has_image": torch.tensor(False)}, "no_image")
    assert no_image.patches is None and no_image.tile is None
    assert no_image.hours is not None and np.abs(no_image.hours).max() > 0
    for result in (no_series, no_image):
        files = write_saliency(result, tmp_path)
        assert files["figure"].stat().st_size > 10_000
        with np.load(files["arrays"]) as arrays:
            assert ("hours" in arrays) == (result.hours is not None)
            assert ("patches" in arrays) == (result.patches is not None)
    with pytest.raises(InputError, match="neither view"):
        saliency(task, {**sample, "has_image": torch.tensor(False),
                        "has_series": torch.tensor(False)})  # fmt: skip


def test_saliency_command_writes_the_figure(
    trained_run: TrainedRun, small_manifest: Path, shared_data: Path, test_rows: pd.DataFrame,
    tmp_path: Path, capsys,
) -> None:  # fmt: skip
    sample_id = test_rows["sample_id"].iloc[1]
    argv = ["explain", "--ckpt_path", str(trained_run.ckpt), "--manifest", str(small_manifest),
            "--sample-id", sample_id, "--series", str(shared_data / "footfall" / "counts.csv.gz"),
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "gradient x input of log p(fused class)" in capsys.readouterr().out
    with Image.open(tmp_path / f"saliency_{sample_id}.png") as image:
        assert image.size[0] > 800 and image.size[1] > 300
    with np.load(tmp_path / f"saliency_{sample_id}.npz") as arrays:
        assert arrays["patches"].shape == (4, 4) and arrays["hours"].shape == (672,)
        assert np.isfinite(arrays["patches"]).all() and np.abs(arrays["hours"]).max() > 0
        assert arrays["probs"].sum() == pytest.approx(1.0, abs=1e-5)
    # An id the manifest does not hold: one line naming the manifest and the column.
    argv[argv.index(sample_id)] = "no-such-sample"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(small_manifest) in err.replace("\n", "") and "column 'sample_id'" in err
    assert not (tmp_path / "saliency_no-such-sample.png").exists()
