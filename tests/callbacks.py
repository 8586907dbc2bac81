"""Callbacks for tests that drive the real CLI in a subprocess.

Append one to a config's callbacks with jsonargparse's ``+=`` (after any
``--trainer.callbacks.<arg>`` meant for the config's own callbacks, which act on the last one)::

    fusion fit --config configs/mbt_mid.yaml ... \\
        --trainer.callbacks+=tests.callbacks.KillAt \\
        --trainer.callbacks.epoch 1 --trainer.callbacks.batch 2
"""

from __future__ import annotations

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
