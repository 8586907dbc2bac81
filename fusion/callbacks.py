"""Lightning callbacks that connect the task with the data layer.

:class:`FrozenImageTokens`: a frozen ViT computes the same tokens for a tile in every epoch,
fold and run, so the datamodule computes them once per tile, caches them on disk and serves them
in the batches (:meth:`FusionDataModule.use_image_tokens`); the task reads what the batch holds.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from fusion.data.cache import file_fingerprint
from fusion.task import FusionTask


def attach_image_tokens(task: FusionTask, dm: Any, device: torch.device | str = "cpu") -> bool:
    """Have ``dm`` serve the frozen part of ``task``'s ViT as ``image_tokens`` (computed on
    ``device`` where not cached). False for data without a token cache, and for a model without
    a frozen ViT (``dm`` then serves decoded tiles)."""
    encoder = task.net.image_encoder
    if not hasattr(dm, "use_image_tokens"):
        return False
    if not task.caches_image_tokens:
        dm.drop_image_tokens()  # another model's tokens must not reach this one
        return False
    weights = encoder.weights
    identity = [
        encoder.config,
        file_fingerprint(weights) if weights not in (None, "hub") else weights,
    ]
    encoder.to(device)

    def encode(images: torch.Tensor) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        try:
            return encoder.frozen_part(images.to(device))
        finally:
            encoder.train(was_training)

    dm.use_image_tokens(encode, identity)
    return True


class FrozenImageTokens(L.Callback):
    """Before any loader is built (``setup``), attach the task's frozen ViT tokens to the
    trainer's datamodule (:func:`attach_image_tokens`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, FusionTask) and trainer.datamodule is not None:
            attach_image_tokens(pl_module, trainer.datamodule, trainer.strategy.root_device)
