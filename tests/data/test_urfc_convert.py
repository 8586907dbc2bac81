"""``fusion data urfc``: a URFC folder written by hand (real AID tiles resized to 100 x 100,
visit files with known users, days and hours) converted into a manifest and an activity table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusion.cli import main
from fusion.data.series import SeriesTable, parse_start
from fusion.data.urfc import HOURS, URFC_TIMEZONE, convert_urfc, urfc_submission
from fusion.errors import InputError, InputErrors
from tests.conftest import config

# Per region: visit lines. 2018-10-01 (a Monday) is day 0; hour h of day d is slot 24 d + h.
# "reg" is seen on 7 distinct days (a regular with the default 7), "once" on one day.
REGULAR = "reg\t" + ",".join(f"201810{d:02d}&08" for d in range(1, 8))  # days 0-6, hour 8
VISITS = {
    ("train", "000001_001"): [REGULAR, "once\t20181001&08|09"],
    ("train", "000002_001"): ["once\t20190331&23"],  # the last hour of the 182 days
    ("train", "000003_002"): [REGULAR],
    ("train", "000004_005"): ["a\t20181225&12", "b\t20181225&12"],
    ("test", "000000"): ["x\t20181010&00"],
    ("test", "000005"): ["y\t20181011&01"],
}
TILES = {"001": "DenseResidential", "002": "Center", "005": "Airport"}


def write_urfc(root: Path, shared_data: Path) -> Path:
    for (split, stem), lines in VISITS.items():
        folder = root / f"{split}_image"
        if split == "train":
            folder = folder / stem[-3:]
        folder.mkdir(parents=True, exist_ok=True)
        source = TILES.get(stem[-3:], "Park")
        tile = next((shared_data / "aid" / source).glob("*.jpg"))
        Image.open(tile).convert("RGB").resize((100, 100)).save(folder / f"{stem}.jpg")
        visits = root / f"{split}_visit"
        visits.mkdir(parents=True, exist_ok=True)
        (visits / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def urfc(tmp_path: Path, shared_data: Path) -> Path:
    return write_urfc(tmp_path / "urfc", shared_data)


def test_conversion_cell_by_cell(urfc: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = convert_urfc(urfc, out, workers=2, chunk=2)  # several row groups
    assert done.areas == 6 and not done.skipped and done.report is None
    manifest = pd.read_csv(done.manifest, dtype=str, keep_default_na=False)
    assert manifest["sample_id"].tolist() == [
        "000001_001", "000002_001", "000003_002", "000004_005", "000000", "000005",
    ]  # fmt: skip
    assert manifest["label"].tolist() == ["residential"] * 2 + ["school", "airport", "", ""]
    assert manifest["split"].tolist() == ["train"] * 4 + ["test"] * 2
    assert set(manifest["hours"]) == {str(HOURS)}
    assert (out / manifest["image"][0]).resolve() == (urfc / "train_image/001/000001_001.jpg")
    table = pq.read_table(done.activity).to_pandas()
    assert len(table) == 6 * HOURS and pq.ParquetFile(done.activity).num_row_groups == 3
    assert str(table["timestamp"].dt.tz) == URFC_TIMEZONE
    first = table[table["area_id"] == "000001_001"].reset_index(drop=True)
    assert first["timestamp"][0] == pd.Timestamp("2018-10-01T00:00", tz=URFC_TIMEZONE)
    expected = np.zeros((3, HOURS), dtype=np.float32)  # visits, regulars, others
    for day in range(7):
        expected[:2, 24 * day + 8] += 1  # the regular, hour 8 of days 0-6
    expected[[0, 2], 8] += 1  # "once" at 08 and 09 of day 0
    expected[[0, 2], 9] += 1
    got = first[["visits", "regulars", "others"]].to_numpy().T
    np.testing.assert_array_equal(got, expected)
    last = table[table["area_id"] == "000002_001"]
    assert last["visits"].to_numpy()[-1] == 1 and last["visits"].sum() == 1
    assert last["timestamp"].iloc[-1] == pd.Timestamp("2019-03-31T23:00", tz=URFC_TIMEZONE)
    both = table[table["area_id"] == "000004_005"]["visits"].to_numpy()
    assert both[24 * 85 + 12] == 2  # 2018-12-25 is day 85
    # The project's own reader takes the table as it is: the same window, zone-aware.
    series = SeriesTable.read(
        done.activity, key_column="area_id", value_columns=("visits", "regulars", "others")
    )
    window = series.window("000001_001", parse_start(manifest["start"][0]), HOURS)
    np.testing.assert_array_equal(window.values.T, expected)
    assert window.present.all()


def test_regulars_follow_the_setting(urfc: Path, tmp_path: Path) -> None:
    done = convert_urfc(urfc, tmp_path / "out", regular_days=8, workers=1)
    table = pq.read_table(done.activity).to_pandas()
    assert table["regulars"].sum() == 0  # nobody was seen on 8 days
    assert table["others"].sum() == table["visits"].sum()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda r: (r / "train_visit/000002_001.txt").write_bytes(b"u\t2018\xff\n"), "not UTF-8"),
        (lambda r: (r / "train_visit/000002_001.txt").write_text("u 20181001&08\n"),
         "expected 'USERID<TAB>"),
        (lambda r: (r / "train_visit/000002_001.txt").write_text("u\t20190401&08\n"),
         "outside the 26 weeks"),
        (lambda r: (r / "train_visit/000002_001.txt").write_text("u\t20181001&24\n"),
         "is not 00-23"),
        (lambda r: (r / "train_visit/000002_001.txt").unlink(), "tile without a visit file"),
        (lambda r: (r / "train_image/001/000002_001.jpg").unlink(), "visit file without a tile"),
        (lambda r: (r / "train_image/001").rename(r / "train_image/010"),
         "unknown category folder '010'"),
    ],
)  # fmt: skip
def test_each_bad_file_is_named_and_nothing_is_written(
    urfc: Path, tmp_path: Path, damage, words: str
) -> None:
    damage(urfc)
    out = tmp_path / "out"
    with pytest.raises(InputErrors) as info:
        convert_urfc(urfc, out, workers=1)
    assert words in str(info.value)
    assert all(e.file and Path(e.file).is_relative_to(urfc) for e in info.value.errors)
    assert not out.exists() or not any(out.iterdir())


def test_skip_leaves_bad_regions_out_and_lists_them(urfc: Path, tmp_path: Path, capsys) -> None:
    bad = urfc / "train_visit" / "000002_001.txt"
    bad.write_text("u\t20181001&08\nv\t20181001&99\n")
    out = tmp_path / "out"
    argv = ["data", "urfc", "--root", str(urfc), "--output", str(out), "--on-error", "skip",
            "--workers", "1"]  # fmt: skip
    assert main(argv) == 0
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert "000002_001" not in set(manifest["sample_id"]) and len(manifest) == 5
    report = pd.read_csv(out / "skipped.csv")
    assert report["file"].tolist() == [str(bad)] and report["line"].tolist() == [2]
    printed = capsys.readouterr().out
    assert "5 regions" in printed and "files/s" in printed and "skipped.csv" in printed


def test_converted_urfc_trains_and_predicts_a_submission(
    urfc: Path, tmp_path: Path, shared_data: Path, vit_weights: Path, capsys
) -> None:
    """The converted folder goes through the one data path: fit (configs/urfc.yaml read over a
    variant, tiny settings), then predict the test regions into a URFC submission."""
    out = tmp_path / "converted"
    convert_urfc(urfc, out, workers=1)
    run = tmp_path / "run"
    argv = [
        "fit", *config("mbt_mid"), "--config", "configs/urfc.yaml",
        "--data.manifest", str(out / "manifest.csv"),
        "--data.series", str(out / "activity.parquet"),
        "--data.image_size", "28", "--data.cache_dir", str(tmp_path / "cache"),
        "--model.net.vit_weights", str(vit_weights), "--model.net.token_grid", "2",
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--refit", "false",
        "--trainer.default_root_dir", str(run),
    ]  # fmt: skip
    assert main(argv) == 0
    preds = tmp_path / "preds.csv"
    argv = ["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
            "--manifest", str(out / "manifest.csv"), "--series", str(out / "activity.parquet"),
            "--split", "test", "--format", "urfc", "--output", str(preds)]  # fmt: skip
    assert main(argv) == 0
    rows = pd.read_csv(preds, dtype=str, keep_default_na=False)
    # Both views read (a tile unlike the val places' may also be flagged uncertain).
    assert (rows["has_image"] == "True").all() and (rows["has_series"] == "True").all()
    assert set(rows["status"]) <= {"image+series", "uncertain"}
    lines = preds.with_suffix(".txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["000000", "000005"]
    categories = {f"{i:03d}" for i in range(1, 10)}
    assert all(line.split("\t")[1] in categories for line in lines)
    assert "2 areas" in capsys.readouterr().out


def test_a_submission_needs_a_category_for_every_area() -> None:
    text = urfc_submission(["000000", "000007_003"], ["school", "hospital"])
    assert text == "000000\t002\n000007\t009\n"
    with pytest.raises(InputError, match="1 areas have no URFC category predicted \\(000001"):
        urfc_submission(["000000", "000001"], ["school", ""])
