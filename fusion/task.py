"""The Lightning task: trains both branches and the fusion module, and produces the class.

One :class:`FusionTask` covers every variant (series-only BiLSTM baseline, image-only ViT, late
concat, MsIFT, MBT early/mid/late) through its ``net`` settings (see
:class:`fusion.models.classifier.FusionClassifier`). The checkpoint holds the class names, the
normalisation statistics and the whole model config (``data_info`` and ``net``), so predicting
needs nothing else.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from fusion.calibration import (
    calibrated_probabilities,
    calibration_errors,
    expected_calibration_error,
    fit_view_weights,
)
from fusion.conformal import ConformalCalibration
from fusion.data.contract import DataContract
from fusion.metrics import SCALARS, ClassificationScores, plot_confusion
from fusion.models.classifier import FusionClassifier, NetConfig
from fusion.models.experts import pool_experts
from fusion.ood import OodCalibration

Batch = dict[str, Tensor]
VIEWS = ("image", "series")  # what a model of both views reports alone
IMAGE_HEAD = "image"  # the image expert's head (fusion.models.experts), for OOD flags


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


@dataclass
class Collected:
    """Per-sample outputs gathered over an evaluation epoch (one type for val and test rows):
    ``index (N,)`` (the row of the data), ``label (N,)``, each head's ``heads (N, H, K)``, the
    pooled ``logits (N, K)``, and for a model of both views each view's calibrated probabilities
    alone, ``views[name] (N, K)``."""

    index: Tensor
    label: Tensor
    heads: Tensor
    logits: Tensor
    views: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: Sequence[Collected]) -> Collected:
        """The parts one after the other."""
        columns = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in fields(cls)
            if f.name != "views"
        }
        views = {v: torch.cat([p.views[v] for p in parts]) for v in parts[0].views}
        return cls(**columns, views=views)


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
        data_info: the data's :class:`~fusion.data.contract.DataContract` as a dict (classes,
            class weights, band statistics, bands, tile size, window and series settings), from
            :meth:`FusionDataModule.contract`; linked automatically by the CLI.
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

    A frozen ViT's tokens come with the batch when the datamodule serves them
    (``image_tokens``, see :class:`fusion.callbacks.FrozenImageTokens`); otherwise the ViT runs
    on the batch's images.

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
    ) -> None:
        super().__init__()
        if data_info is None:
            raise ValueError("data_info is required (the CLI links it from the datamodule)")
        net = asdict(NetConfig.of(net))  # what save_hyperparameters records (data only)
        self.save_hyperparameters()
        self.contract = DataContract.from_dict(data_info)
        self.classes: list[str] = list(self.contract.classes)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()
        # Softmax temperature fitted on the validation split after each validation epoch of
        # training (Guo et al. 2017), so every checkpoint carries its own calibration.
        self.register_buffer("temperature", torch.ones(()))
        # APS scores of the val places for prediction sets (fusion.conformal), with the heads'
        # weights; saved in checkpoints beside the state dict.
        self.conformal: ConformalCalibration | None = None
        # Energies of the image expert on the val places, for out-of-distribution flags
        # (fusion.ood); saved likewise.
        self.ood: OodCalibration | None = None
        self._rows: list[Collected] = []  # of the current validation or test epoch

    @classmethod
    def known_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The settings of ``hparams`` (e.g. a checkpoint's) this version takes; those since
        retired (such as ``cache_dir``, now the datamodule's) are left out."""
        known = inspect.signature(cls.__init__).parameters
        return {k: v for k, v in hparams.items() if k in known and k != "self"}

    # ------------------------------------------------------------------ configuration hooks
    def configure_models(self) -> None:
        data = self.contract
        self.net = FusionClassifier(
            num_classes=len(self.classes),
            in_chans=data.in_chans,
            n_features=data.n_features,
            n_counts=len(data.value_columns),
            img_size=data.image_size,
            net=NetConfig.of(self.hparams.net),
        )

    def configure_losses(self) -> None:
        weights = self.contract.class_weights if self.hparams.class_weights else None
        self.criterion = nn.CrossEntropyLoss(
            weight=None if weights is None else torch.tensor(weights, dtype=torch.float32),
            label_smoothing=self.hparams.label_smoothing,
        )

    def configure_metrics(self) -> None:
        k = len(self.classes)
        self.val_metrics = ClassificationScores(k)
        self.test_metrics = ClassificationScores(k)

    # ------------------------------------------------------------------ forward
    @property
    def caches_image_tokens(self) -> bool:
        """Whether the image encoder is frozen where its tokens can be cached per tile."""
        encoder = self.net.image_encoder
        return encoder is not None and encoder.cacheable

    def _inputs(self, batch: Batch) -> dict[str, Tensor | None]:
        """The classifier's keyword arguments for a batch: the image tokens the batch holds
        (a frozen ViT's, cached) run through the trainable rest, or the ViT on its images."""
        tokens = batch.get("image_tokens") if self.caches_image_tokens else None
        if tokens is not None:
            tokens = self.net.image_encoder.trainable_part(tokens.float())
        elif self.net.image_encoder is not None:
            tokens = self.net.encode_image(batch["image"])
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

    def _collect(self, batch: Batch, out: dict[str, Tensor]) -> None:
        views = {v: out[f"probs_{v}"].float().cpu() for v in VIEWS if f"probs_{v}" in out}
        row = Collected(
            index=batch["index"].cpu(),
            label=batch["label"].cpu(),
            heads=out["heads"].detach().float().cpu(),
            logits=out["logits"].detach().float().cpu(),
            views=views,
        )
        self._rows.append(row)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self._outputs(batch, views=False)
        loss = self.criterion(out["logits"], batch["label"])
        self.log("val/loss", loss, batch_size=len(batch["label"]), sync_dist=True)
        self.val_metrics.update(out["logits"], batch["label"])
        self._collect(batch, out)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Scores :meth:`predict_step`'s outputs: the rows it predicts (those with a view this
        model reads), as ``fusion predict`` writes them."""
        out = self.predict_step(batch)
        rows = out["pred"] >= 0
        if not bool(rows.any()):
            return
        batch = {k: v[rows] for k, v in batch.items() if isinstance(v, Tensor)}
        out = {k: v[rows] for k, v in out.items()}
        loss = self.criterion(out["logits"], batch["label"])
        self.log("test/loss", loss, batch_size=len(batch["label"]), sync_dist=True)
        self.test_metrics.update(out["logits"], batch["label"])
        self._collect(batch, out)

    def calibrated(self, logits: Tensor) -> Tensor:
        """Class probabilities ``(B, K)`` of ``logits (B, K)`` at the fitted temperature."""
        return calibrated_probabilities(logits.float(), self.temperature)

    def _outputs(self, batch: Batch, views: bool = True) -> dict[str, Tensor]:
        """Each head's ``heads (B, H, K)``, the pooled ``logits (B, K)``, calibrated ``probs
        (B, K)`` and ``pred (B,)``; with ``views``, for a model of both views also
        ``probs_image`` and ``probs_series (B, K)``: the model's output with the other view
        removed (NaN for samples without that view). The ViT runs once; the two extra passes
        are the series encoder and the fusion module."""
        inputs = self._inputs(batch)
        named = self.net.heads(**inputs)
        logits = pool_experts(named, self.net.view_weights)
        probs = self.calibrated(logits)
        out = {
            "heads": torch.stack(list(named.values()), dim=1),
            "logits": logits,
            "probs": probs,
            "pred": probs.argmax(-1),
        }
        if views and self.net.fusion_kind != "none":
            for view, other in zip(VIEWS, reversed(VIEWS), strict=True):
                removed = torch.zeros_like(batch[f"has_{other}"])
                alone = self.calibrated(self.net(**{**inputs, f"has_{other}": removed}))
                present = batch[f"has_{view}"][:, None]
                out[f"probs_{view}"] = torch.where(
                    present, alone, torch.full_like(alone, torch.nan)
                )
        return out

    def predict_step(self, batch: Batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """:meth:`_outputs` of the samples that have a view this model reads; the others (no
        image for an image-only model, no view at all) get ``pred`` -1 and NaN scores. Also
        ``index``, and ``has_image`` / ``has_series`` (the views this model used)."""
        has_image = batch["has_image"] & (self.net.image_encoder is not None)
        has_series = batch["has_series"] & (self.net.series_encoder is not None)
        usable = has_image | has_series
        used = {"index": batch["index"], "has_image": has_image, "has_series": has_series}
        if bool(usable.all()):
            return {**self._outputs(batch), **used}
        n, k, device = len(usable), len(self.classes), usable.device
        shapes = {"heads": (n, len(self.net.head_names), k), "logits": (n, k), "probs": (n, k)}
        if self.net.fusion_kind != "none":
            shapes.update({f"probs_{v}": (n, k) for v in VIEWS})
        out = {name: torch.full(shape, torch.nan, device=device) for name, shape in shapes.items()}
        out["pred"] = torch.full((n,), -1, dtype=torch.long, device=device)
        if bool(usable.any()):
            rows = {k: v[usable] for k, v in batch.items() if isinstance(v, Tensor)}
            for name, value in self._outputs(rows).items():
                out[name][usable] = value.to(out[name].dtype)
        return {**out, **used}

    def _all_rows(self) -> Collected:
        """This epoch's rows; under DDP those of every process, each sample once
        (``DistributedSampler`` repeats a few to even out the processes), in index order. Every
        process must call this (it is a collective)."""
        rows = Collected.concat(self._rows)
        if self.trainer.world_size == 1:
            return rows
        gathered = self.all_gather(
            {"index": rows.index, "label": rows.label, "heads": rows.heads,
             "logits": rows.logits, **{f"view_{v}": p for v, p in rows.views.items()}}
        )  # fmt: skip
        flat = {k: t.flatten(0, 1).cpu() for k, t in gathered.items()}  # (world * N, ...)
        _, first = np.unique(flat["index"].numpy(), return_index=True)
        keep = {k: t[torch.from_numpy(first)] for k, t in flat.items()}
        views = {k.removeprefix("view_"): t for k, t in keep.items() if k.startswith("view_")}
        return Collected(keep["index"], keep["label"], keep["heads"], keep["logits"], views)

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
        self._rows = []

    def on_test_epoch_start(self) -> None:
        self._rows = []

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if self.trainer.sanity_checking or not fitting or not self._rows:
            return  # the weights are fitted while training only, on full validation epochs
        rows = self._all_rows()  # all processes' rows under DDP
        heads, labels = rows.heads, rows.label
        weights = fit_view_weights(heads.unbind(dim=1), labels)
        self.set_view_weights(weights)
        pooled = torch.einsum("nhk,h->nk", heads.double(), torch.tensor(weights).double())
        places = np.array(self._places(rows.index.numpy()), dtype=object)
        probs = pooled.softmax(dim=-1).numpy()
        self.conformal = ConformalCalibration.fit(probs, labels.numpy(), places)
        if IMAGE_HEAD in self.net.head_names:
            image = heads[:, self.net.head_names.index(IMAGE_HEAD)]
            has_tile = (image != 0).any(dim=-1).numpy()  # an absent view's expert gives zeros
            if has_tile.any():
                self.ood = OodCalibration.fit(image[has_tile].numpy(), places[has_tile])
        self.log_dict(
            {
                "val/temperature": self.temperature.item(),
                "val/ece": expected_calibration_error(
                    calibrated_probabilities(heads.sum(dim=1)), labels
                ),
                "val/ece_calibrated": expected_calibration_error(
                    calibrated_probabilities(pooled), labels
                ),
                **{
                    f"val/weight/{name}": float(w)
                    for name, w in zip(self.net.head_names, self.net.view_weights, strict=True)
                },
            }
        )

    def _places(self, index: np.ndarray) -> list[str]:
        """The place of each row ``index`` of the datamodule (its ``groups``), or the row
        itself where the datamodule has no places."""
        groups = getattr(getattr(self.trainer, "datamodule", None), "groups", None)
        return [str(i) for i in index] if groups is None else [str(g) for g in groups[index]]

    def set_view_weights(self, weights: Sequence[float]) -> None:
        """Pool the heads with ``weights`` (one per head, fitted by
        :func:`~fusion.calibration.fit_view_weights`): stored as their shares
        (``net.view_weights``) and the temperature ``1 / sum(weights)``."""
        total = float(sum(weights))
        self.net.view_weights.copy_(torch.tensor(weights) / total)
        self.temperature.fill_(1.0 / total)

    @torch.no_grad()
    def held_out_heads(self, batches: Iterable[Batch]) -> tuple[Tensor, Tensor]:
        """Each head's logits on ``batches`` (e.g. the val rows), ``(N, H, K)``, and their
        labels ``(N,)``."""
        was_training = self.training
        self.eval()
        parts = [(self._outputs(b, views=False)["heads"], b["label"]) for b in batches]
        self.train(was_training)
        return torch.cat([h for h, _ in parts]), torch.cat([y for _, y in parts])

    def calibrate_like(self, other: FusionTask) -> None:
        """Pool the heads with ``other``'s weights and temperature (a refit takes those its
        first stage fitted on held-out places: it has none left to fit them on)."""
        self.net.view_weights.copy_(other.net.view_weights)
        self.temperature.copy_(other.temperature)
        self.conformal, self.ood = other.conformal, other.ood

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.conformal is not None:
            checkpoint["conformal"] = self.conformal.to_dict()
        if self.ood is not None:
            checkpoint["ood"] = self.ood.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("conformal")  # none before prediction sets existed
        self.conformal = None if state is None else ConformalCalibration.from_dict(state)
        state = checkpoint.get("ood")
        self.ood = None if state is None else OodCalibration.from_dict(state)
        # Checkpoints from before calibration existed predict with temperature 1.
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))
        checkpoint["state_dict"].setdefault(
            "net.view_weights", torch.ones(len(self.net.head_names))
        )

    def on_test_epoch_end(self) -> None:
        values = self._log_metrics(self.test_metrics, "test")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        rows = self._all_rows()  # all processes' rows under DDP
        ece, ece_calibrated = calibration_errors(rows.logits, rows.label, self.temperature.item())
        self.log_dict({"test/ece": ece, "test/ece_calibrated": ece_calibrated})
        if not self.trainer.is_global_zero:
            return
        frame = predictions_frame(
            rows.index.numpy(),
            rows.label.numpy(),
            self.calibrated(rows.logits).numpy(),
            self.classes,
            {v: p.numpy() for v, p in rows.views.items()},
        )
        frame.to_csv(folder / "predictions_test.csv", index=False)
        plot_confusion(
            values["confusion"].cpu(),
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
