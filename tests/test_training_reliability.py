"""Training through the real CLI is reproducible, resumable and runs under DDP.

Every run is ``python -m fusion.cli fit`` of the ``mbt_mid`` variant in a subprocess, on the
small slice of the real benchmark (image size 56, token grid 2, a narrow fusion module so that a
run takes seconds), 3 epochs of 2 batches:

- two runs with the same seed log the same metrics and end with the same weights, bit for bit
  (the first builds the caches, the second reads them);
- a run hard-killed in the middle of epoch 2 and resumed from its ``last.ckpt`` ends exactly as
  the uninterrupted run;
- 2-process DDP on CPU (gloo) trains, fits the temperature on both processes' validation rows,
  and its checkpoint tests on one device.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from fusion.calibration import fit_view_weights
from fusion.task import FusionTask
from fusion.training import build_cli
from tests.conftest import IMAGE_SIZE, config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per CLI run (about 10-30 s each on 2 idle cores)
EPOCHS = 3  # of 2 training batches (60 train rows, batch size 30)


@dataclass(frozen=True)
class Runner:
    args: list[str]  # settings shared by every run (after the subcommand)
    env: dict[str, str]

    def __call__(self, command: str, root: Path, *extra: str, logs: bool = True):
        """``fusion COMMAND`` with the shared settings; trainer folder ``root``, checkpoints in
        ``root/checkpoints``.

        ``logs``: per-step and per-epoch metrics to ``root/logs/version_N/metrics.csv``.
        """
        logger = (
            '{"class_path": "lightning.pytorch.loggers.CSVLogger", '
            f'"init_args": {{"save_dir": "{root}", "name": "logs"}}}}'
            if logs
            else "false"
        )
        argv = [
            sys.executable, "-m", "fusion.cli", command, *self.args,
            "--trainer.default_root_dir", str(root),
            "--trainer.logger", logger,
            *extra,
        ]  # fmt: skip
        return subprocess.run(
            argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=TIMEOUT
        )


def check(run: subprocess.CompletedProcess, returncode: int = 0) -> None:
    assert run.returncode == returncode, f"exit {run.returncode}:\n{run.stderr[-4000:]}"


def metrics(root: Path) -> pd.DataFrame:
    """Every logged value of a run: ``epoch, step, metric, value``, in a fixed order."""
    (path,) = (root / "logs").glob("version_*/metrics.csv")
    frame = pd.read_csv(path).melt(id_vars=["epoch", "step"], var_name="metric").dropna()
    return frame.sort_values(["epoch", "step", "metric"], ignore_index=True)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def fusion(small_manifest: Path, shared_data: Path, vit_weights: Path, tmp_path_factory) -> Runner:
    tmp = tmp_path_factory.mktemp("reliability")
    cache = tmp / "cache"  # series windows and ViT tokens, shared by the runs
    args = [
        *config("mbt_mid"),
        "--refit", "false",  # one stage: these tests are about a fit, resumed or distributed
        "--seed_everything", "0",
        "--data.manifest", str(small_manifest),
        "--data.series", str(shared_data / "footfall" / "counts.csv.gz"),
        "--data.split", "manifest",
        "--data.image_size", str(IMAGE_SIZE),
        "--data.batch_size", "30",
        "--data.cache_dir", str(cache),
        "--model.net.vit_weights", str(vit_weights),
        "--model.net.token_grid", "2",
        "--model.net.series_dim", "32",
        "--model.net.series_depth", "1",
        "--model.net.fusion_dim", "32",
        "--model.net.fusion_heads", "2",
        "--model.net.fusion_depth", "2",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    # Compiled bytecode in a folder of its own: each subprocess then imports torch and Lightning
    # from .pyc files, also where PYTHONDONTWRITEBYTECODE is set (the venv is never written to).
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return Runner(args, env)


@pytest.fixture(scope="module")
def uninterrupted(fusion: Runner, tmp_path_factory) -> Path:
    """Trainer folder of a full run (cold caches): ``checkpoints/last.ckpt``,
    ``logs/.../metrics.csv``."""
    root = tmp_path_factory.mktemp("uninterrupted")
    check(fusion("fit", root))
    return root


def test_same_seed_same_metrics_and_weights(fusion: Runner, uninterrupted: Path, tmp_path) -> None:
    check(fusion("fit", tmp_path))  # warm caches this time
    first, second = metrics(uninterrupted), metrics(tmp_path)
    assert set(first["epoch"]) == set(range(EPOCHS))
    assert {"train/loss", "val/macro_f1", "val/temperature"} <= set(first["metric"])
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert_same_weights(
        uninterrupted / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.ckpt"
    )


def test_killed_and_resumed_run_ends_as_the_uninterrupted_one(
    fusion: Runner, uninterrupted: Path, tmp_path: Path
) -> None:
    killed = fusion(
        "fit", tmp_path, "--trainer.callbacks+=tests.callbacks.KillAt",
        "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", "1",
    )  # fmt: skip
    check(killed, -signal.SIGKILL)  # in the middle of the second epoch
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["epoch"] == 0
    for log in (tmp_path / "logs").glob("version_*"):
        log.rename(tmp_path / f"killed-{log.name}")  # keep only the resumed run's metrics

    check(fusion("fit", tmp_path, "--ckpt_path", str(last)))
    resumed = metrics(tmp_path)
    assert set(resumed["epoch"]) == {1, 2}
    expected = metrics(uninterrupted)
    expected = expected[expected["epoch"] >= 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed, expected, check_exact=True)
    assert_same_weights(uninterrupted / "checkpoints" / "last.ckpt", last)


def test_ddp_two_processes_on_cpu(fusion: Runner, uninterrupted: Path, tmp_path: Path) -> None:
    # ``uninterrupted`` first: the caches are warm, so the two processes only read them.
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    check(fusion("fit", tmp_path, *ddp, "--trainer.max_epochs", "2", logs=False))
    last = tmp_path / "checkpoints" / "last.ckpt"
    temperature = float(weights(last)["temperature"])
    assert math.isfinite(temperature) and temperature > 0

    check(fusion("test", tmp_path, "--ckpt_path", str(last), "--trainer.devices", "1", logs=False))
    assert len(pd.read_csv(tmp_path / "predictions_test.csv")) == 6 * 4  # every test row once
    # The heads' weights and temperature were fitted on the val rows of both processes:
    # fitting them again on every val row, in one process, gives them back.
    dm = build_cli(fusion.args, run=False).datamodule
    task = FusionTask.load_from_checkpoint(last, weights_only=True, map_location="cpu").eval()
    heads, labels = task.held_out_heads(dm.val_dataloader())
    assert len(labels) == 6 * 4
    fitted = torch.tensor(fit_view_weights(heads.unbind(dim=1), labels))
    assert 1 / float(fitted.sum()) == pytest.approx(temperature, rel=1e-4)
    assert (fitted / fitted.sum()).tolist() == pytest.approx(
        task.net.view_weights.tolist(), rel=1e-4
    )
