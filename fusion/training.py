"""Lightning's CLI over :class:`fusion.task.FusionTask` and
:class:`fusion.data.datamodule.FusionDataModule`; the two-stage fit (:func:`refit`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from fusion.calibration import fit_view_weights
from fusion.callbacks import FrozenImageTokens
from fusion.data.datamodule import FusionDataModule
from fusion.task import FusionTask


class FusionCLI(LightningCLI):
    """``fusion fit|validate|test``. ``argv``: the arguments parsed (with the subcommand when
    ``run``); a fit with ``--refit true`` trains its second stage from them (:func:`refit`).

    A run's files go under ``trainer.default_root_dir`` (``ROOT``, default the working folder)
    unless the settings give their own logger or callbacks of the kind: metrics in
    ``ROOT/logs/version_N/`` (CSV and TensorBoard), the last epoch's weights in
    ``ROOT/checkpoints/last.ckpt``; and a rich progress bar.
    """

    def __init__(self, argv: list[str], run: bool = True) -> None:
        self.argv = argv
        super().__init__(
            FusionTask,
            FusionDataModule,
            args=argv,
            run=run,
            seed_everything_default=0,
            trainer_defaults={"callbacks": [FrozenImageTokens()]},  # always there
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model learns the data's classes, statistics and shapes from the datamodule;
        # they are saved in the checkpoint with the model config.
        parser.link_arguments(
            "data",
            "model.data_info",
            compute_fn=lambda dm: dm.contract().to_dict(),
            apply_on="instantiate",
        )
        parser.add_argument(
            "--refit",
            type=bool,
            default=False,
            help="after fitting (stage 1: the val places fit the heads' weights), train a "
            "fresh model on every place (train and val) for as many epochs, with stage 1's "
            "weights; its checkpoints replace stage 1's, which move to 'heldout/' beside them",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Checkpoints are loaded as data only: never run pickled code from a file.
        parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        # Lightning reads a checkpoint's hyperparameters into the model's settings (``test``,
        # ``validate --ckpt_path``); those this version no longer has are left out, as
        # ``fusion predict`` leaves them out.
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        hparams = FusionTask.known_hparams(ckpt.get("hyper_parameters") or {})
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # What the settings leave unset is derived from the run folder, so a variant's config
        # names it once (default_root_dir) and a config read over another keeps its files.
        root = str(config["default_root_dir"] or os.getcwd())
        if config["logger"] is None:  # unset; False turns logging off
            config["logger"] = [CSVLogger(root, name="logs"), TensorBoardLogger(root, name="logs")]
        given = config["callbacks"] or []
        given = given if isinstance(given, list) else [given]
        derived: list[Callback] = []
        if config["enable_progress_bar"] is not False and not _has(given, ProgressBar):
            derived.append(RichProgressBar())
        if config["enable_checkpointing"] is not False and not _has(given, ModelCheckpoint):
            # A fixed epoch budget: the model is the last epoch's; a new run replaces its file.
            derived.append(
                ModelCheckpoint(
                    dirpath=Path(root, "checkpoints"), filename="last", enable_version_counter=False
                )
            )
        config["callbacks"] = [*derived, *given]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        config = self.config["fit"]
        if config["refit"]:
            refit(self.argv[1:], self.trainer, self.model, config["data"]["inner_folds"])


def _has(callbacks: list[Callback], kind: type[Callback]) -> bool:
    return any(isinstance(c, kind) for c in callbacks)


def build_cli(argv: list[str], run: bool = True) -> FusionCLI:
    """Lightning's CLI over :class:`FusionTask` and :class:`FusionDataModule`.

    ``run=False`` parses and instantiates only (``argv`` without a subcommand); the caller drives
    ``cli.trainer``, ``cli.model`` and ``cli.datamodule`` (see :mod:`fusion.experiments`).
    ``fusion fit --refit true`` trains in two stages (:func:`refit`).
    """
    return FusionCLI(argv, run=run)


def refit(argv: list[str], trainer: Trainer, stage1: FusionTask, inner_folds: int = 0) -> FusionCLI:
    """Stage 2 of a fit: a fresh model trained on every place stage 1 saw (its train and val
    rows; the test rows stay out) for the same number of epochs, pooling its heads with weights
    fitted on held-out places.

    Those weights are stage 1's, fitted on its val places; with ``inner_folds >= 2``
    (cross-fitting) a model is also trained for every other inner fold, and the weights are
    fitted on the val rows of them all, so every training place weighs the heads once. Stage 1's
    checkpoints move to ``heldout/`` in their folder; stage 2's take their place. ``argv``:
    stage 1's settings (no subcommand). Returns stage 2's CLI.
    """
    folder = Path(trainer.checkpoint_callback.dirpath)
    heldout = folder / "heldout"
    shutil.rmtree(heldout, ignore_errors=True)
    heldout.mkdir(parents=True)
    for ckpt in folder.glob("*.ckpt"):
        ckpt.rename(heldout / ckpt.name)
    if inner_folds >= 2:
        parts = [stage1.held_out_heads(trainer.datamodule.val_dataloader())]
        for k in range(1, inner_folds):
            inner = build_cli([*argv, "--data.inner_fold", str(k), "--refit", "false"], run=False)
            inner.trainer.checkpoint_callback.dirpath = str(heldout / f"inner{k}")
            inner.trainer.fit(inner.model, inner.datamodule)
            parts.append(inner.model.held_out_heads(inner.datamodule.val_dataloader()))
        heads, labels = (torch.cat(column) for column in zip(*parts, strict=True))
        stage1.set_view_weights(fit_view_weights(heads.unbind(dim=1), labels))
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    cli = build_cli([*argv, "--data.val_fraction", "0", "--refit", "false"], run=False)
    cli.model.calibrate_like(stage1)
    cli.trainer.fit(cli.model, cli.datamodule)
    shares = zip(stage1.net.head_names, stage1.net.view_weights.tolist(), strict=True)
    weights = " · ".join(f"{name} {w:.2f}" for name, w in shares)
    train = cli.datamodule.splits == "train"
    places = len(set(cli.datamodule.groups[train]))
    nan = float("nan")
    print(
        f"stage 1 on its val places (never trained on): "
        f"macro-F1 {scores.get('val/macro_f1', nan):.3f}, OA {scores.get('val/OA', nan):.3f}; "
        f"heads weighted {weights}, temperature {stage1.temperature.item():.3f}\n"
        f"stage 2 trained on {train.sum()} rows of {places} places: "
        f"{cli.trainer.checkpoint_callback.best_model_path}"
    )
    return cli
