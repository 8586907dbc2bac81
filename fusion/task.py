"""The Lightning task: trains both branches and the fusion module, and produces the class.

One :class:`FusionTask` covers every variant (series-only BiLSTM baseline, image-only ViT, late
concat, MsIFT, MBT early/mid/late) through its ``net`` settings (see
:class:`fusion.models.classifier.FusionClassifier`). The checkpoint holds the class names, the
normalisation statistics and the whole model config (``data_info`` and ``net``), so predicting
needs nothing else.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fusion.calibration import (
    calibration_errors,
    expected_calibration_error,
    fit_view_weights,
)
from fusion.data.cache import cache_key, cached_arrays, file_fingerprint
from fusion.metrics import SCALARS, ClassificationScores, plot_confusion
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.models.experts import pool_experts

Batch = dict[str, Tensor]
VIEWS = ("image", "series")  # what a model of both views reports alone


def epoch_seed(*parts: int) -> int:
    """A seed made of integers such as ``(seed, epoch, rank)``, unrelated for different parts
    (unlike ``seed + epoch``: seed 1's first epoch would draw what seed 0's second drew)."""
    words = [p & 0xFFFF_FFFF_FFFF_FFFF for p in parts]  # SeedSequence takes non-negative ints
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def probability_columns(
    probs: np.ndarray, classes: list[str], views: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """``pred`` and ``p_<class>`` of calibrated ``probs (N, K)``; per view in ``views`` (the
    model with the other view removed) ``pred_<view>`` and ``p_<view>_<class>``. A row of NaN
    (not predicted, or without that view) gets an empty class name."""
    names = np.array(classes, dtype=object)
    columns: dict[str, Any] = {}
    for prefix, p in {"": probs, **(views or {})}.items():
        seen = ~np.isnan(p[:, 0])
        columns[f"pred_{prefix}".rstrip("_")] = np.where(
            seen, names[np.nan_to_num(p).argmax(axis=1)], ""
        )
        for k, name in enumerate(classes):
            columns[f"p_{prefix}_{name}" if prefix else f"p_{name}"] = p[:, k]
    return pd.DataFrame(columns)


def predictions_frame(
    rows: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    views: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per predicted sample: manifest ``row``, true ``label`` and
    :func:`probability_columns`."""
    frame = pd.DataFrame({"row": rows, "label": np.array(classes, dtype=object)[labels]})
    return pd.concat([frame, probability_columns(probs, classes, views)], axis=1)


class FusionTask(L.LightningModule):
    """Cross-entropy training of a :class:`FusionClassifier` with OA / macro-F1 / kappa metrics.

    Args:
        data_info: facts about the data from :meth:`FusionDataModule.info` (classes, class
            weights, band statistics, bands, tile size, series features); linked automatically by
            the CLI.
        net: the network's settings (:class:`NetConfig`; a dict of its fields, such as a
            checkpoint's, is accepted too). Saved as a plain dict, so that a checkpoint loads
            with ``torch.load(weights_only=True)``.
        lr: learning rate of the new layers; ``head_lr`` of the classification heads (default:
            ``lr``); ``backbone_lr`` of a trainable ViT, with ``layer_decay`` per block below the
            top.
        weight_decay: AdamW weight decay; ``series_weight_decay`` of the series encoder and
            the series expert (default: ``weight_decay``): a series branch trained on a few
            places per class memorises them unless held back hard.
        warmup_epochs: linear warm-up, then cosine decay to zero at the end of training.
        label_smoothing: cross-entropy label smoothing.
        class_weights: weight the loss by inverse class frequency of the training rows.
        modality_dropout: share of training samples that lose one view (image or series, half
            each), so the model learns to predict from either view alone.
        cache_dir: where frozen-ViT tokens are cached (default as the data cache; ``""`` off).

    Reproducibility: every training epoch re-seeds torch's global RNG (modality dropout, dropout
    layers) from ``(seed_everything, epoch, global rank)``, and the datamodule shuffles epoch
    ``e`` by ``seed + e``; so two runs with the same seeds train identically, and a run resumed
    from a checkpoint saved at the end of an epoch (``last.ckpt``) ends as the uninterrupted run.

    Under DDP the temperature is fitted on the validation rows of all processes, and ``fusion
    test`` gathers all processes' rows before rank 0 writes ``predictions_test.csv``.
    """

    def __init__(
        self,
        data_info: dict[str, Any] | None = None,
        net: NetConfig = NetConfig(),  # noqa: B008 (frozen: one shared default is safe)
        lr: float = 1e-3,
        head_lr: float | None = None,
        series_weight_decay: float | None = None,
        backbone_lr: float = 1e-5,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: bool = True,
        modality_dropout: float = 0.0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if data_info is None:
            raise ValueError("data_info is required (the CLI links it from the datamodule)")
        net = asdict(NetConfig.of(net))  # what save_hyperparameters records (data only)
        self.save_hyperparameters()
        self.classes: list[str] = list(data_info["classes"])
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        self._tokens: Tensor | None = None
        self._tokens_key: str | None = None
        self._tokens_dm: Any = None
        self.token_seconds = 0.0  # spent computing (not loading) frozen-ViT tokens
        # Softmax temperature fitted on the validation split after each validation epoch of
        # training (Guo et al. 2017), so every checkpoint carries its own calibration.
        self.register_buffer("temperature", torch.ones(()))
        self._val_rows: list[tuple[Tensor, Tensor, Tensor]] = []  # index, logits, label

    # ------------------------------------------------------------------ configuration hooks
    def configure_models(self) -> None:
        info = self.hparams.data_info
        self.net = FusionClassifier(
            num_classes=len(self.classes),
            in_chans=info["in_chans"],
            n_features=info["n_features"],
            n_counts=len(info["value_columns"]),
            img_size=info["image_size"],
            **asdict(NetConfig.of(self.hparams.net)),
        )

    def configure_losses(self) -> None:
        info = self.hparams.data_info
        weights = info.get("class_weights") if self.hparams.class_weights else None
        self.criterion = nn.CrossEntropyLoss(
            weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
            label_smoothing=self.hparams.label_smoothing,
        )

    def configure_metrics(self) -> None:
        k = len(self.classes)
        self.val_metrics = ClassificationScores(k)
        self.test_metrics = ClassificationScores(k)

    # ------------------------------------------------------------------ frozen image tokens
    @property
    def caches_image_tokens(self) -> bool:
        encoder = self.net.image_encoder
        return encoder is not None and encoder.cacheable

    def _ensure_image_tokens(self, dm: Any = None) -> None:
        """Compute a frozen ViT's tokens once per tile of ``dm`` (default: the trainer's
        datamodule; cached on disk); stop decoding its tiles."""
        if dm is None and self._trainer is not None:
            dm = self.trainer.datamodule
        if not self.caches_image_tokens or dm is None:
            return
        if self._tokens is not None and self._tokens_dm is dm:
            return  # every validation epoch lands here: no re-hashing of the tiles
        self.frozen_tokens(dm)
        self._tokens_dm = dm
        dm.set_load_images(False)

    def frozen_tokens(self, dm: Any) -> Tensor:
        """The frozen ViT's tokens of every row of ``dm``, ``(N, 1 + G*G, D)`` float16: from the
        disk cache, or computed once and cached (the time spent adds to ``token_seconds``)."""
        encoder = self.net.image_encoder
        info = self.hparams.data_info
        weights = encoder.weights
        key = cache_key(
            "vit-tokens-v1",
            encoder.config,
            file_fingerprint(weights) if weights not in (None, "hub") else weights,
            [dm.band_stats.to_dict(), info["bands"], info["nodata"]],
            dm.image_fingerprints(),
        )
        if key != self._tokens_key or self._tokens is None:
            start = time.perf_counter()
            arrays, hit = cached_arrays(
                "vit-tokens",
                key,
                lambda: {"tokens": self._encode_all(dm)},
                cache_dir=self.hparams.cache_dir,
            )
            if not hit:
                self.token_seconds += time.perf_counter() - start
            self._tokens = torch.from_numpy(arrays["tokens"])
            self._tokens_key = key
        return self._tokens

    @torch.no_grad()
    def _encode_all(self, dm: Any) -> np.ndarray:
        """Tokens of every row's tile, ``(N, 1 + G*G, D)`` float16 (zeros where no tile)."""
        from rich.progress import track

        encoder = self.net.image_encoder
        was_training = encoder.training
        encoder.eval()
        dataset = dm.dataset("all")
        # Its own generator: computing tokens must not move the global RNG, or a run with a cold
        # cache would train differently from the same run with a warm one.
        loader = DataLoader(dataset, batch_size=16, generator=torch.Generator().manual_seed(0))
        out = np.zeros((len(dataset), encoder.num_tokens, encoder.out_dim), dtype=np.float16)
        for batch in track(loader, description="ViT tokens (frozen, cached)"):
            tokens = encoder.frozen_part(batch["image"].to(self.device))
            out[batch["index"].numpy()] = tokens.cpu().numpy().astype(np.float16)
        encoder.train(was_training)
        return out

    def on_fit_start(self) -> None:
        self._ensure_image_tokens()

    def on_validation_start(self) -> None:
        self._ensure_image_tokens()

    def on_test_start(self) -> None:
        self._ensure_image_tokens()

    # ------------------------------------------------------------------ forward
    def image_tokens(self, images: Tensor) -> Tensor:
        """ViT tokens ``(B, 1 + G*G, D)`` of ``images (B, C, S, S)``.

        The frozen part's tokens are rounded to float16, as they are cached, so a model gives
        the same outputs whether they come from the cache (fit, test) or are computed on the
        spot (``fusion predict``).
        """
        encoder = self.net.image_encoder
        assert encoder is not None
        if not encoder.cacheable:
            return encoder(images)[0]
        return encoder.trainable_part(encoder.frozen_part(images).half().float())

    def _inputs(self, batch: Batch) -> dict[str, Tensor | None]:
        """The classifier's keyword arguments for a batch (image tokens from the cache, or
        computed here once)."""
        tokens = None
        if self._tokens is not None and batch["image"].numel() == 0:
            cached = self._tokens[batch["index"].cpu()].to(self.device, torch.float32)
            tokens = self.net.image_encoder.trainable_part(cached)
        elif self.net.image_encoder is not None:
            tokens = self.image_tokens(batch["image"])
        return {
            "image": batch["image"],
            "series": batch["series"],
            "series_mask": batch["series_mask"],
            "has_image": batch["has_image"],
            "has_series": batch["has_series"],
            "image_tokens": tokens,
        }

    def forward(self, batch: Batch) -> Tensor:
        """Logits ``(B, K)`` for a batch from :class:`FusionDataModule` (the heads pooled)."""
        return self.net(**self._inputs(batch))

    def heads(self, batch: Batch) -> dict[str, Tensor]:
        """Each head's logits ``(B, K)`` (see :meth:`FusionClassifier.heads`)."""
        return self.net.heads(**self._inputs(batch))

    def _drop_modalities(self, batch: Batch) -> dict[str, Tensor]:
        """Views to hide from the fusion (``hide_image``, ``hide_series``, ``(B,)`` bool) for
        ``modality_dropout`` of the samples, one view each (never both); none when off."""
        p = self.hparams.modality_dropout
        if p <= 0 or self.net.fusion_kind == "none":
            return {}
        draw = torch.rand(batch["has_image"].shape, device=self.device)
        return {
            "hide_image": (draw < p / 2) & batch["has_series"],
            "hide_series": (draw >= p / 2) & (draw < p) & batch["has_image"],
        }

    # ------------------------------------------------------------------ steps
    def on_train_epoch_start(self) -> None:
        # The seed is seed_everything's (Lightning keeps it in PL_GLOBAL_SEED; the CLI always
        # seeds, default 0): the seed that experiments vary per run. Without it, no re-seeding.
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            torch.manual_seed(epoch_seed(int(seed), self.current_epoch, self.global_rank))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Every head learns on its own cross-entropy (an expert on the samples with its view;
        modality dropout hides views from the fusion only): the heads are pooled only after
        training, with weights fitted on held-out places."""
        present = {"image": batch["has_image"], "series": batch["has_series"]}
        heads = self.net.heads(**self._inputs(batch), **self._drop_modalities(batch))
        loss = torch.zeros((), device=self.device)
        for name, logits in heads.items():
            rows = present.get(name) if name != self.net.head_names[0] else None
            if rows is None:
                loss = loss + self.criterion(logits, batch["label"])
            elif rows.any():
                loss = loss + self.criterion(logits[rows], batch["label"][rows])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        named = self.heads(batch)
        logits = pool_experts(named, self.net.view_weights)
        heads = torch.stack(list(named.values()), dim=1)  # (B, H, K)
        loss = self.criterion(logits, batch["label"])
        self.log("val/loss", loss, batch_size=len(logits), sync_dist=True)
        self.val_metrics.update(logits, batch["label"])
        rows = (batch["index"].cpu(), heads.detach().float().cpu(), batch["label"].cpu())
        self._val_rows.append(rows)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.predict_step(batch)
        logits = out["logits"]
        loss = self.criterion(logits, batch["label"])
        self.log("test/loss", loss, batch_size=len(logits), sync_dist=True)
        self.test_metrics.update(logits, batch["label"])
        views = [out[f"probs_{v}"].float().cpu() for v in VIEWS if f"probs_{v}" in out]
        rows = (batch["index"].cpu(), batch["label"].cpu(), logits.detach().float().cpu(), *views)
        self._test_rows.append(rows)

    def on_test_epoch_start(self) -> None:
        self._test_rows: list[tuple[Tensor, Tensor, Tensor]] = []

    def calibrated(self, logits: Tensor) -> Tensor:
        """Class probabilities ``(B, K)`` of ``logits (B, K)`` at the fitted temperature."""
        return (logits.float() / self.temperature.to(logits.device)).softmax(dim=-1)

    def predict_step(self, batch: Batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """Raw ``logits (B, K)``, calibrated ``probs (B, K)`` and ``pred (B,)`` of a batch; for a
        model of both views also ``probs_image`` and ``probs_series (B, K)``: the model's output
        with the other view removed (NaN for samples without that view). The ViT runs once; the
        two extra passes are the series encoder and the fusion module."""
        inputs = self._inputs(batch)
        logits = self.net(**inputs)
        probs = self.calibrated(logits)
        out = {"index": batch["index"], "logits": logits, "probs": probs, "pred": probs.argmax(-1)}
        if self.net.fusion_kind != "none":
            for view, other in zip(VIEWS, reversed(VIEWS), strict=True):
                removed = torch.zeros_like(batch[f"has_{other}"])
                alone = self.calibrated(self.net(**{**inputs, f"has_{other}": removed}))
                present = batch[f"has_{view}"][:, None]
                out[f"probs_{view}"] = torch.where(
                    present, alone, torch.full_like(alone, torch.nan)
                )
        return out

    def _all_rows(self, rows: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """The per-batch ``(index, ...)`` rows concatenated; under DDP those of every process,
        each sample once (``DistributedSampler`` repeats a few to even out the processes), in
        index order. Every process must call this (it is a collective)."""
        parts = tuple(torch.cat(column) for column in zip(*rows, strict=True))
        if self.trainer.world_size == 1:
            return parts
        parts = tuple(t.flatten(0, 1).cpu() for t in self.all_gather(parts))  # (world * N, ...)
        _, first = np.unique(parts[0].numpy(), return_index=True)
        return tuple(t[torch.from_numpy(first)] for t in parts)

    def _log_metrics(self, metrics: ClassificationScores, stage: str) -> dict[str, Tensor]:
        """Log ``stage/OA``, ``stage/macro_f1``, ``stage/kappa`` and ``stage/f1/<class>`` (classes
        present in the evaluated rows only); returns :meth:`ClassificationScores.compute`."""
        values = metrics.compute()
        metrics.reset()
        scalars = {f"{stage}/{name}": values[name] for name in SCALARS}
        for name, f1 in zip(self.classes, values["f1_per_class"], strict=True):
            if not torch.isnan(f1):
                scalars[f"{stage}/f1/{name}"] = f1
        self.log_dict(scalars, prog_bar=stage == "val")
        return values

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if self.trainer.sanity_checking or not fitting or not self._val_rows:
            return  # the temperature is fitted while training only, on full validation epochs
        _, heads, labels = self._all_rows(self._val_rows)  # all processes' rows under DDP
        weights = fit_view_weights(heads.unbind(dim=1), labels)
        self.set_view_weights(weights)
        pooled = torch.einsum("nhk,h->nk", heads.double(), torch.tensor(weights).double())
        self.log_dict(
            {
                "val/temperature": self.temperature.item(),
                "val/ece": expected_calibration_error(heads.sum(dim=1).softmax(dim=1), labels),
                "val/ece_calibrated": expected_calibration_error(pooled.softmax(dim=1), labels),
                **{
                    f"val/weight/{name}": float(w)
                    for name, w in zip(self.net.head_names, self.net.view_weights, strict=True)
                },
            }
        )

    def set_view_weights(self, weights: Sequence[float]) -> None:
        """Pool the heads with ``weights`` (one per head, fitted by
        :func:`~fusion.calibration.fit_view_weights`): stored as their shares
        (``net.view_weights``) and the temperature ``1 / sum(weights)``."""
        total = float(sum(weights))
        self.net.view_weights.copy_(torch.tensor(weights) / total)
        self.temperature.fill_(1.0 / total)

    @torch.no_grad()
    def held_out_heads(self, dm: Any) -> tuple[Tensor, Tensor]:
        """Each head's logits on ``dm``'s val rows, ``(N, H, K)``, and their labels ``(N,)``."""
        was_training = self.training
        self.eval()
        self._ensure_image_tokens(dm)
        batches = list(dm.val_dataloader())
        heads = torch.cat([torch.stack(list(self.heads(b).values()), dim=1) for b in batches])
        self.train(was_training)
        return heads, torch.cat([b["label"] for b in batches])

    def calibrate_like(self, other: FusionTask) -> None:
        """Pool the heads with ``other``'s weights and temperature (a refit takes those its
        first stage fitted on held-out places: it has none left to fit them on)."""
        self.net.view_weights.copy_(other.net.view_weights)
        self.temperature.copy_(other.temperature)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints from before calibration existed predict with temperature 1.
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))
        checkpoint["state_dict"].setdefault(
            "net.view_weights", torch.ones(len(self.net.head_names))
        )

    def on_test_epoch_end(self) -> None:
        values = self._log_metrics(self.test_metrics, "test")
        self.test_confusion = values["confusion"].cpu()
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        # All processes' rows under DDP; for a model of both views also each view alone.
        index, labels, logits, *views = self._all_rows(self._test_rows)
        ece, ece_calibrated = calibration_errors(logits, labels, self.temperature.item())
        self.log_dict({"test/ece": ece, "test/ece_calibrated": ece_calibrated})
        self.test_predictions = predictions_frame(
            index.numpy(),
            labels.numpy(),
            self.calibrated(logits).numpy(),
            self.classes,
            dict(zip(VIEWS, (v.numpy() for v in views), strict=False)),
        )
        if not self.trainer.is_global_zero:
            return
        self.test_predictions.to_csv(folder / "predictions_test.csv", index=False)
        plot_confusion(
            self.test_confusion,
            self.classes,
            folder / "confusion_test.png",
            title=f"test: OA {values['OA']:.3f}, macro-F1 {values['macro_f1']:.3f}",
        )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        encoder = self.net.image_encoder
        backbone = set()
        groups: list[dict[str, Any]] = []
        if encoder is not None and not encoder.frozen:
            groups = encoder.param_groups(hp.backbone_lr, hp.layer_decay)
            backbone = {id(p) for g in groups for p in g["params"]}
        # New parameters by (is a head, is on the series side): their rate and weight decay.
        heads = {id(p) for h in self.net.head_modules() for p in h.parameters()}
        series = {id(p) for m in self.net.series_modules() for p in m.parameters()}
        head_lr = hp.lr if hp.head_lr is None else hp.head_lr
        decay = hp.weight_decay if hp.series_weight_decay is None else hp.series_weight_decay
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]
        for in_head in (False, True):
            for in_series in (False, True):
                params = [
                    p for p in new if (id(p) in heads, id(p) in series) == (in_head, in_series)
                ]
                if params:
                    groups.append({
                        "params": params,
                        "lr": head_lr if in_head else hp.lr,
                        "weight_decay": decay if in_series else hp.weight_decay,
                        "name": ("head" if in_head else "new") + (".series" if in_series else ""),
                    })  # fmt: skip
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, int(hp.warmup_epochs * total / epochs))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
