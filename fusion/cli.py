"""The ``fusion`` command line.

- ``fusion fit|validate|test|predict --config configs/NAME.yaml``: Lightning's CLI over
  :class:`fusion.task.FusionTask` and :class:`fusion.data.datamodule.FusionDataModule`.
- ``fusion data inspect --manifest FILE``: what a manifest holds, as tables and a gallery.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from fusion.errors import InputError, InputErrors

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="look at input data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "inspect",
        help="counts per label and split, series coverage, tile formats, and a PNG gallery",
    )
    p.add_argument("--manifest", required=True, help="CSV of samples")
    p.add_argument("--series", help="activity table (default: the bundle's beside the manifest)")
    p.add_argument("--image-root", help="folder that relative image paths start from")
    p.add_argument("--key-column", default="sensor_id")
    p.add_argument("--time-column", default="timestamp")
    p.add_argument("--value-columns", nargs="+", default=["count"])
    p.add_argument("--timezone", help="IANA zone for naive timestamps")
    p.add_argument("--min-present", type=float, default=0.5)
    p.add_argument("--split", choices=["manifest", "stratified", "place"], default="manifest")
    p.add_argument("--output", default="results/inspect", help="folder for gallery.png")


def _experiment_parsers(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting")
    common.add_argument("--output", required=True, type=Path, help="results folder")
    common.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="after --: settings passed to every run, e.g. -- --trainer.max_epochs 5",
    )
    p = sub.add_parser(
        "ablate", parents=[common], help="train+test each MBT fusion depth over seeds"
    )
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--depths", nargs="+", default=["early", "mid", "late"])
    p = sub.add_parser(
        "compare", parents=[common], help="train+test models over seeds, against a baseline"
    )
    p.add_argument("--configs", nargs="+", required=True, help="names in configs/ or YAML paths")
    p.add_argument("--baseline", default="bilstm")
    p = sub.add_parser("report", help="write the README's Results section from result folders")
    p.add_argument("--ablation", type=Path)
    p.add_argument("--compare", type=Path)
    p.add_argument("--readme", type=Path, default=Path("README.md"))


def _experiment(args: argparse.Namespace) -> int:
    from fusion import experiments

    overrides = [a for a in (getattr(args, "overrides", None) or []) if a != "--"]
    if args.command == "ablate":
        args.output.mkdir(parents=True, exist_ok=True)
        experiments.ablate(args.config, args.depths, args.seeds, args.output, overrides)
        print((args.output / "summary.md").read_text())
    elif args.command == "compare":
        args.output.mkdir(parents=True, exist_ok=True)
        experiments.compare(
            args.configs, args.seeds, args.output, baseline=args.baseline, overrides=overrides
        )
        print((args.output / "summary.md").read_text())
    else:
        experiments.write_readme_results(args.readme, args.ablation, args.compare)
        print(f"updated the Results section of {args.readme}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from fusion.data.datamodule import FusionDataModule
    from fusion.data.inspect import inspect

    dm = FusionDataModule(
        manifest=args.manifest,
        series=args.series,
        image_root=args.image_root,
        key_column=args.key_column,
        time_column=args.time_column,
        value_columns=args.value_columns,
        timezone=args.timezone,
        min_present=args.min_present,
        split=args.split,
    )
    inspect(dm, Path(args.output))
    return 0


def build_cli(argv: list[str], run: bool = True):
    """Lightning's CLI over :class:`FusionTask` and :class:`FusionDataModule`.

    ``run=False`` parses and instantiates only (``argv`` without a subcommand); the caller drives
    ``cli.trainer``, ``cli.model`` and ``cli.datamodule`` (see :mod:`fusion.experiments`).
    """
    from lightning.pytorch.cli import LightningCLI

    from fusion.data.datamodule import FusionDataModule
    from fusion.task import FusionTask

    class FusionCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model learns the data's classes, statistics and shapes from the datamodule;
            # they are saved in the checkpoint with the model config.
            parser.link_arguments(
                "data", "model.data_info", compute_fn=lambda dm: dm.info(), apply_on="instantiate"
            )

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            # Checkpoints are loaded as data only: never run pickled code from a file.
            parser.set_defaults(weights_only=True)
            return parser

    return FusionCLI(
        FusionTask,
        FusionDataModule,
        args=argv,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            build_cli(argv)
            return 0
        parser = argparse.ArgumentParser(
            prog="fusion",
            description="Urban functional-zone classification from tiles + activity series. "
            f"Training and evaluation: fusion {{{','.join(LIGHTNING_COMMANDS)}}} --config FILE.",
        )
        sub = parser.add_subparsers(dest="command", required=True)
        _data_parser(sub)
        _experiment_parsers(sub)
        args = parser.parse_args(argv)
        return _inspect(args) if args.command == "data" else _experiment(args)
    except (InputError, InputErrors) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
