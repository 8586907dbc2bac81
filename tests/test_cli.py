"""The ``fusion`` command line, end to end on the real benchmark."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from fusion.cli import main
from fusion.configs import CHECKOUT_CONFIGS, config_args, config_files
from tests.conftest import config


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


def test_semicolon_manifest_names_the_delimiter(shared_data: Path, tmp_path: Path, capsys):
    lines = (shared_data / "paired" / "manifest.csv").read_text().splitlines()[:10]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(line.replace(",", ";") for line in lines) + "\n")
    code = main(["data", "inspect", "--manifest", str(manifest), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "looks ';'-separated" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("stale_log_streams")
@pytest.mark.parametrize("command", ["fit", "data"])
def test_empty_manifest_is_one_error_line(
    command: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Also through Lightning's CLI, which wraps what the datamodule raises in a ValueError."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("sample_id,image,sensor_id,start,hours,label,split\n")
    configs = config_args(config_files("bilstm", CHECKOUT_CONFIGS))  # from anywhere
    monkeypatch.chdir(tmp_path)  # whatever the config would write lands here
    argv = {
        "fit": ["fit", *configs, "--data.manifest", str(manifest),
                "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
        "data": ["data", "inspect", "--manifest", str(manifest), "--output", str(tmp_path / "o")],
    }[command]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    said = f"error: {manifest}: manifest has a header but no rows (no samples)"
    assert " ".join(err.split()).endswith(said) and "Traceback" not in err  # (rich wraps lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]


@pytest.mark.parametrize("argv", [[], ["data"], ["data", "inspect"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


@pytest.fixture
def stale_log_streams(monkeypatch) -> None:
    """Lightning's log handler may still write to an earlier test's closed capture stream: let
    logging drop those lines quietly instead of printing its own "Logging error" traceback."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture
def ctrl_c():
    """Python's usual SIGINT handler, as in a terminal (a background job starts with SIGINT
    ignored, and then ``main`` leaves it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_ends_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def stopped(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("fusion.cli._inspect", stopped)
    handler = signal.getsignal(signal.SIGINT)
    code = main(["data", "inspect", "--manifest", str(tmp_path / "m.csv")])
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGINT) is handler  # main's own handler is gone again


@pytest.mark.usefixtures("ctrl_c", "stale_log_streams")
def test_ctrl_c_during_lightning_fit_ends_with_one_line(tmp_path: Path, monkeypatch, capsys):
    """Lightning catches Ctrl-C in fit itself (graceful shutdown, then ``sys.exit(1)``)."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as the terminal does on Ctrl-C

    trainers: list[Trainer] = []

    def fit(argv: list[str]) -> None:
        trainer = Trainer(
            max_epochs=100, callbacks=[CtrlC()], default_root_dir=tmp_path, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainers.append(trainer)
        trainer.fit(BoringModel())

    monkeypatch.setattr("fusion.training.build_cli", fit)
    handler = signal.getsignal(signal.SIGINT)
    assert main(["fit", *config("vit")]) == 130
    assert trainers[0].interrupted and trainers[0].global_step == 2  # stopped where sent
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is handler  # not left ignored by Lightning


def test_other_exits_pass_through(monkeypatch) -> None:
    def fails(argv: list[str]) -> None:
        raise SystemExit(1)

    monkeypatch.setattr("fusion.training.build_cli", fails)
    with pytest.raises(SystemExit) as info:
        main(["fit", *config("vit")])
    assert info.value.code == 1


def test_an_ignored_ctrl_c_stays_ignored(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        "fusion.cli._inspect", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0
    )
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["data", "inspect", "--manifest", "m.csv"]) == 0
        assert seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
