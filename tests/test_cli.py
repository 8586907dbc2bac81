"""The ``fusion`` command line, end to end on the real benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fusion.cli import main


def test_data_inspect_on_the_benchmark(
    shared_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))
    manifest = shared_data / "paired" / "manifest.csv"
    code = main(["data", "inspect", "--manifest", str(manifest), "--output", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "railway_station" in printed and "1785" in printed and "150x150" in printed
    gallery = tmp_path / "out" / "gallery.png"
    with Image.open(gallery) as image:
        assert image.size[0] > 500 and image.size[1] > 6 * 100  # one row per label
    assert not list((tmp_path / "out").glob(".gallery-*"))  # no temporary left behind


def test_data_inspect_reports_bad_rows(shared_data: Path, tmp_path: Path, capsys) -> None:
    lines = (shared_data / "paired" / "manifest.csv").read_text().splitlines()
    broken = [*lines[:4], lines[3].replace("aid/", "aid/nowhere/"), lines[5]]
    broken[4] = broken[4].replace(broken[4].split(",")[0], "p99999")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(broken) + "\n")
    code = main(
        ["data", "inspect", "--manifest", str(manifest), "--image-root", str(shared_data),
         "--series", str(shared_data / "footfall" / "counts.csv.gz"),
         "--output", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "line 5" in err and "file not found" in err and str(manifest) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [[], ["data"], ["data", "inspect"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
