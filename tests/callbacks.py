"""Callbacks for tests that drive the real CLI in a subprocess.

Append one to the run's callbacks with jsonargparse's ``+=``; the ``--trainer.callbacks.<arg>``
after it set its arguments (the run's checkpoint callback and progress bar are added all the
same, :class:`fusion.training.FusionCLI`)::

    fusion fit --config configs/base.yaml --config configs/variants/mbt_mid.yaml ... \\
        --trainer.callbacks+=tests.callbacks.KillAt \\
        --trainer.callbacks.epoch 1 --trainer.callbacks.batch 2
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import lightning as L


class KillAt(L.Callback):
    """Kill the process with ``SIGKILL`` as training batch ``batch`` of epoch ``epoch`` (both
    0-based) starts: no hook, ``finally`` or checkpoint runs, as when a machine is lost."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordRows(L.Callback):
    """Append the manifest rows of a fit's training and validation batches, and the heads'
    weights and temperature it ends with, as one JSON line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.train: set[int] = set()
        self.val: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.update(batch["index"].tolist())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.update(batch["index"].tolist())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "train": sorted(self.train),
            "val": sorted(self.val),
            "weights": pl_module.net.view_weights.tolist(),
            "temperature": pl_module.temperature.item(),
        }
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
