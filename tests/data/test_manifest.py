"""Manifest reading and the class list, on the real benchmark manifest and small broken copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion.data.manifest import (
    LINE,
    ClassList,
    default_series_path,
    read_manifest,
    resolve_image_root,
)
from fusion.errors import InputError, InputErrors

HEADER = "sample_id,image,sensor_id,start,hours,label,split\n"
ROW = "s{i},aid/School/school_{i}.jpg,mel_RMIT_T,2021-03-01T00:00:00+11:00,672,school,train\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_real_manifest(shared_data: Path) -> None:
    path = shared_data / "paired" / "manifest.csv"
    frame = read_manifest(path)
    assert len(frame) == 1785
    assert frame[LINE].iloc[0] == 2 and frame[LINE].iloc[-1] == 1786
    assert set(frame["hours"]) == {672}
    counts = frame.groupby(["label", "split"]).size()
    # Counts from shared/data/paired/README.md.
    assert counts[("civic", "train")] == 330 and counts[("civic", "val")] == 83
    assert counts[("residential", "train")] == 392 and counts[("school", "val")] == 42
    assert (frame["split"] == "train").sum() == 1428 and (frame["split"] == "val").sum() == 357
    assert resolve_image_root(path, frame["image"].tolist()) == shared_data.resolve()
    assert default_series_path(path) == (shared_data / "footfall" / "counts.csv.gz").resolve()


def test_duplicate_sample_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + ROW.format(i=1) + ROW.format(i=2) + ROW.format(i=1))
    with pytest.raises(InputErrors) as info:
        read_manifest(path)
    (err,) = info.value.errors
    assert err.line == 4 and err.field == "sample_id" and "first on line 2" in str(err)
    assert str(path) in str(info.value)


def test_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "sample_id,image,start,hours\ns1,a.jpg,2021-01-01T00:00:00Z,24\n")
    with pytest.raises(InputError, match="sensor_id"):
        read_manifest(path)
    frame = read_manifest(path, key_column="image")  # another key column name is accepted
    assert len(frame) == 1


def test_all_row_problems_reported_together(tmp_path: Path) -> None:
    rows = [
        "s1,a.jpg,k,2021-01-01T00:00:00Z,zero,x,train\n",  # bad hours
        "s2,,,2021-01-01T00:00:00Z,24,x,train\n",  # neither view
        "s3,a.jpg,k,2021-01-01T00:00:00Z,24,x,holdout\n",  # bad split
        ",a.jpg,k,2021-01-01T00:00:00Z,24,x,train\n",  # empty id
    ]
    path = write(tmp_path, HEADER + "".join(rows))
    with pytest.raises(InputErrors) as info:
        read_manifest(path)
    found = {(e.line, e.field) for e in info.value.errors}
    assert found == {(2, "hours"), (3, "image"), (4, "split"), (5, "sample_id")}


@pytest.mark.parametrize(("sep", "name"), [(";", "';'"), ("\t", "tab"), ("|", "'|'")])
def test_other_delimiter_is_named(shared_data: Path, tmp_path: Path, sep: str, name: str) -> None:
    lines = (shared_data / "paired" / "manifest.csv").read_text().splitlines()[:20]
    path = write(tmp_path, "\n".join(line.replace(",", sep) for line in lines) + "\n")
    with pytest.raises(InputError) as info:
        read_manifest(path)
    message = str(info.value)
    assert info.value.file == str(path) and "missing column(s)" in message
    assert repr(lines[0].replace(",", sep)) in message  # the header line as read
    assert f"looks {name}-separated" in message


def test_header_shown_shortened_and_no_hint_for_commas(tmp_path: Path) -> None:
    header = "id,picture," + ",".join(f"extra_column_{i}" for i in range(20))
    path = write(tmp_path, header + "\n1,a.jpg" + "," * 20 + "\n")
    with pytest.raises(InputError, match="missing column") as info:
        read_manifest(path)
    message = str(info.value)
    assert "header read: 'id,picture,extra_column_0" in message and "...'" in message
    assert header not in message and "separated" not in message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (HEADER, "header but no rows"),
        (HEADER + "\n\n", "header but no rows"),
        ("", "manifest is empty"),
    ],
)
def test_empty_manifest(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=match) as info:
        read_manifest(path)
    assert info.value.file == str(path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_class_list() -> None:
    classes = ClassList.from_labels(["park", "civic", "", "park", "school"])
    assert classes.names == ("civic", "park", "school")
    assert classes.index("park") == 1 and "airport" not in classes
    with pytest.raises(ValueError, match="duplicate"):
        ClassList(("a", "a"))


def test_error_seen_from_a_manifest_row() -> None:
    inner = InputError("all pixels are nodata", file="tiles/x.tif", where="region_id=3")
    outer = inner.within("m.csv", line=7, field="image")
    assert str(outer) == (
        "m.csv, line 7, column 'image': tiles/x.tif, region_id=3: all pixels are nodata"
    )
