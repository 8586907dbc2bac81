"""The ``fusion`` command line.

- ``fusion fit|validate|test --config configs/base.yaml --config configs/variants/NAME.yaml``:
  Lightning's CLI over :class:`fusion.task.FusionTask` and
  :class:`fusion.data.datamodule.FusionDataModule` (:mod:`fusion.training`).
- ``fusion predict --ckpt_path MODEL.ckpt (--manifest CSV | --raster TIF --regions GPKG)
  --output FILE``: a trained model on new places (:mod:`fusion.predict`).
- ``fusion explain --predictions PREDS.csv --output DIR``: why each view decided, per sample
  and per class (:mod:`fusion.explain`); ``fusion explain --ckpt_path MODEL.ckpt --manifest CSV
  --sample-id ID --output DIR``: one sample's saliency figure (:mod:`fusion.saliency`).
- ``fusion data inspect --manifest FILE``: what a manifest holds, as tables and a gallery.
- ``fusion bench --output results/bench``: cost of every variant against the bare ViT
  (:mod:`fusion.bench`).
- ``fusion ablate|compare|report``: experiments judged by place-grouped cross-validation
  (:mod:`fusion.experiments`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rich.console import Console

from fusion.data.series import KEY_COLUMN, MIN_PRESENT, TIME_COLUMN
from fusion.data.tiles import MIN_VALID
from fusion.data.urfc import REGULAR_DAYS
from fusion.errors import InputError, InputErrors
from fusion.ood import FLAG_RATE
from fusion.speed import MEASURED, PRESETS, Speed

LIGHTNING_COMMANDS = ("fit", "validate", "test")


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
    p.add_argument("--key-column", default=KEY_COLUMN)
    p.add_argument("--time-column", default=TIME_COLUMN)
    p.add_argument("--value-columns", nargs="+", default=["count"])
    p.add_argument("--timezone", help="IANA zone for naive timestamps")
    p.add_argument("--min-present", type=float, default=MIN_PRESENT)
    p.add_argument("--split", choices=["manifest", "stratified", "place"], default="manifest")
    p.add_argument("--output", default="results/inspect", help="folder for gallery.png")
    p = data_sub.add_parser(
        "urfc",
        help="convert a URFC folder (train_image/, train_visit/, test_image/, test_visit/) into "
        "a manifest and an hourly activity table (Parquet)",
    )
    p.add_argument("--root", required=True, type=Path, help="the URFC folder")
    p.add_argument("--output", required=True, type=Path, help="folder for the converted files")
    p.add_argument("--regular-days", type=int, default=REGULAR_DAYS,
                   help="users seen on so many distinct days in a region are regulars")  # fmt: skip
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="stop: list every bad file, write nothing; skip: leave those regions "
                   "out, listed in skipped.csv")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="parsing processes")


def _share(text: str) -> float:
    """A number strictly between 0 and 1 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="a trained model on new places: a manifest -> CSV, or a raster + regions -> "
        "GeoPackage + PNG map",
        description="Classes, normalisation, bands, tile size and window length come from the "
        "checkpoint. A sample missing one view is predicted from the other (flagged); one with "
        "neither is listed as skipped.",
    )
    p.add_argument("--ckpt_path", "--ckpt-path", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path, help=".csv, or .gpkg for regions")
    pairs = p.add_argument_group("pairs listed like the training manifest")
    pairs.add_argument("--manifest", type=Path)
    pairs.add_argument("--image-root", type=Path, help="folder of relative image paths")
    pairs.add_argument("--split", help="only the rows of this split (train, val or test)")
    regions = p.add_argument_group("a raster cut along region polygons")
    regions.add_argument("--raster", type=Path)
    regions.add_argument("--regions", type=Path, help="polygon layer (GeoPackage, shapefile ...)")
    regions.add_argument("--layer", help="layer of the regions file")
    regions.add_argument("--id-column", default="region_id")
    regions.add_argument("--key", help="column of the regions naming their series")
    regions.add_argument("--start", help="first hour of every region's window (ISO 8601)")
    regions.add_argument("--hours", type=int, help="window length (must be the model's)")
    p.add_argument("--series", type=Path, help="activity table of the new places")
    p.add_argument("--timezone", help="IANA zone for naive timestamps (default: the model's)")
    p.add_argument("--bands", type=int, nargs="+", help="1-based bands (default: the model's)")
    p.add_argument(
        "--min-valid",
        type=float,
        default=MIN_VALID,
        help="least share of a tile or region with data for its image to be used "
        f"(default {MIN_VALID})",
    )
    p.add_argument(
        "--coverage",
        type=_share,
        help="also a conformal prediction set per sample (pred_set, set_size) holding the true "
        "class with this probability on a new place, e.g. 0.9 (calibrated on the places held "
        "out in training)",
    )
    p.add_argument(
        "--flag-rate",
        type=_share,
        default=FLAG_RATE,
        help="mark a prediction uncertain when its tile is less familiar to the model than all "
        "but this share of the held-out places' tiles (image-expert energy; default "
        f"{FLAG_RATE})",
    )
    p.add_argument(
        "--max-set-size",
        type=int,
        help="with --coverage: mark a prediction uncertain when its set holds more classes",
    )
    fast = p.add_argument_group("speed of the frozen ViT (fusion.speed; the model is unchanged)")
    fast.add_argument(
        "--speed", choices=sorted(PRESETS), default="exact",
        help="exact (default): the model as trained; fast: the preset measured by fusion bench "
        f"--parts speed ({PRESETS['fast'].name}); the options below add to the preset",
    )  # fmt: skip
    fast.add_argument("--merge", type=int, help="ToMe: tokens merged per ViT block (0 = off)")
    fast.add_argument("--int8", action="store_true", help="int8 ViT linear layers (CPU)")
    fast.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    fast.add_argument("--compile", action="store_true", help="torch.compile the frozen ViT")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--format",
        choices=["csv", "urfc"],
        default="csv",
        help="urfc: also a URFC submission (AreaID<TAB>CategoryID per area) beside the CSV, "
        "with the .txt suffix",
    )


def _speed(args: argparse.Namespace) -> Speed:
    """The ``--speed`` preset with ``--merge``, ``--int8``, ``--bf16``, ``--compile`` on top."""
    speed = PRESETS[args.speed]
    return dataclasses.replace(
        speed,
        merge=speed.merge if args.merge is None else args.merge,
        int8=speed.int8 or args.int8,
        bf16=speed.bf16 or args.bf16,
        compile=speed.compile or args.compile,
    )


def _predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np

    from fusion.data.prediction import ManifestSamples, PredictionDataModule, RegionSamples
    from fusion.io import atomic_path, check_replaceable
    from fusion.predict import MAP_REGIONS, cap_gdal_cache, check_output, load_model, predict

    cap_gdal_cache()

    if (args.manifest is None) == (args.raster is None):
        parser.error("predict needs either --manifest or --raster with --regions")
    if args.raster is not None and args.regions is None:
        parser.error("--raster needs --regions")
    check_output(args.output, regions=args.raster is not None)  # before any work
    submission = args.output.with_suffix(".txt")
    if args.format == "urfc":
        if args.manifest is None:
            parser.error("--format urfc needs --manifest (the converted URFC manifest)")
        check_replaceable(submission)
    task, contract = load_model(args.ckpt_path)
    if args.bands:
        contract = dataclasses.replace(contract, bands=tuple(args.bands))
    if args.manifest is not None:
        samples: ManifestSamples | RegionSamples = ManifestSamples(
            args.manifest, contract, series=args.series, image_root=args.image_root,
            split=args.split, timezone=args.timezone, min_valid=args.min_valid,
        )  # fmt: skip
    else:
        samples = RegionSamples(
            args.raster, args.regions, contract, id_column=args.id_column, layer=args.layer,
            series=args.series, key=args.key, start=args.start, hours=args.hours,
            timezone=args.timezone, min_valid=args.min_valid,
        )  # fmt: skip
    data = PredictionDataModule(samples, batch_size=args.batch_size, num_workers=args.num_workers)
    speed = _speed(args)
    if speed.name != "exact" and (args.coverage is not None or args.flag_rate is not None):
        print(
            f"note: the prediction sets and unfamiliar-tile flags were calibrated with the exact "
            f"ViT; with --speed {speed.name} they are approximate", file=sys.stderr,
        )  # fmt: skip
    result = predict(
        task, data, args.output, device=args.device, coverage=args.coverage,
        flag_rate=args.flag_rate, max_set_size=args.max_set_size, speed=speed,
    )  # fmt: skip
    if args.format == "urfc":
        from fusion.data.urfc import urfc_submission

        areas = data.describe(np.arange(len(result.pred)))["sample_id"].tolist()
        labels = [task.classes[p] if p >= 0 else "" for p in result.pred]
        with atomic_path(submission) as tmp:
            tmp.write_text(urfc_submission(areas, labels))
        print(f"wrote {submission} ({len(areas)} areas)")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts().items()))
    print(f"wrote {result.output} ({len(result.pred)} rows; {counts})")
    if result.map is not None:
        print(f"wrote {result.map}")
        if result.web_map is None:
            print(f"no HTML map: more than {MAP_REGIONS:,} regions are too many for a browser "
                  f"page (the PNG map is rasterised); open {result.output} in QGIS")  # fmt: skip
    if result.web_map is not None:
        print(f"wrote {result.web_map}")
    if result.metrics:
        m = result.metrics
        print(
            f"{m['n']} labelled rows: OA {m['OA']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
            f"kappa {m['kappa']:.4f}  ECE {m['ece']:.4f} -> {m['ece_calibrated']:.4f} "
            f"calibrated (T={task.temperature.item():.3f})"
        )
    return 0


def _explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="why each view decided: from a predictions CSV, which view moved each prediction "
        "and a per-class report; or, for one sample, a saliency figure of its tile and series",
        description="--predictions PREDS.csv (of fusion predict or fusion test, a model of both "
        "views): DIR/explain.csv, report.csv, report.md, views.png. --ckpt_path CKPT --manifest "
        "M.csv --sample-id ID: DIR/saliency_ID.png and .npz (gradient x input of the fused "
        "class's log-probability over the ViT patch tokens and the series hours).",
    )
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs")
    table = p.add_argument_group("every sample of a predictions table")
    table.add_argument("--predictions", type=Path, help="CSV of fusion predict or fusion test")
    table.add_argument(
        "--by", choices=["pred", "label"], default="pred",
        help="report rows: the fused predicted class (default) or the true class (needs label)",
    )  # fmt: skip
    one = p.add_argument_group("one sample, read as fusion predict reads it")
    one.add_argument("--ckpt_path", "--ckpt-path", type=Path)
    one.add_argument("--manifest", type=Path)
    one.add_argument("--sample-id", help="the manifest row's sample_id")
    one.add_argument("--series", type=Path, help="activity table of the manifest's places")
    one.add_argument("--image-root", type=Path, help="folder of relative image paths")
    one.add_argument("--timezone", help="IANA zone for naive timestamps (default: the model's)")


def _explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    one = (args.ckpt_path, args.manifest, args.sample_id)
    if (args.predictions is None) == all(v is None for v in one):
        parser.error("explain needs either --predictions or --ckpt_path, --manifest, --sample-id")
    if args.predictions is not None:
        from fusion.explain import write_explanation

        done = write_explanation(args.predictions, args.output, by=args.by)
        counts = done.rows["driver"].value_counts()
        drivers = ", ".join(f"{k}: {counts[k]}" for k in ("image", "series", "both", "-")
                            if k in counts)  # fmt: skip
        print(f"explained {len(done.rows)} rows (driver {drivers})")
        print(f"wrote {', '.join(str(f) for f in done.files.values())}")
        return 0
    if any(v is None for v in one):
        parser.error("one sample needs --ckpt_path, --manifest and --sample-id")
    from fusion.saliency import sample_saliency, write_saliency

    result = sample_saliency(
        args.ckpt_path, args.manifest, args.sample_id, series=args.series,
        image_root=args.image_root, timezone=args.timezone,
    )  # fmt: skip
    files = write_saliency(result, args.output)
    print(f"{result.sample_id}: fused {result.pred} ({result.probs.max():.3f}); {result.method}")
    print(f"wrote {files['figure']} and {files['arrays']}")
    return 0


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, memory, parameters and FLOPs of every variant against the bare ViT, "
        "scaling curves, and the data pipeline's speed",
    )
    p.add_argument("--output", type=Path, default=Path("results/bench"))
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--hours", type=int, default=672)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--manifest", default="../shared/data/paired/manifest.csv",
                   help="benchmark manifest for the loader measurement")  # fmt: skip
    p.add_argument("--series", default="../shared/data/footfall/counts.csv.gz",
                   help="real counts the large table is built from")  # fmt: skip
    p.add_argument("--series-rows", type=int, default=10_000_000,
                   help="rows of the generated activity table (0: skip)")  # fmt: skip
    p.add_argument("--parts", nargs="+", choices=["models", "data", "urfc", "speed", "regions"],
                   default=["models", "data"],
                   help="what to measure: the variants, the data pipeline, URFC at city scale "
                   "(generated regions: conversion, windows on disk, training; long), the "
                   "prediction speed options against held-out macro-F1 (trains a model per "
                   "fold once, in --work; long), fusion predict's peak memory against the "
                   "number of regions (generated; long)")  # fmt: skip
    p.add_argument("--regions-counts", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="regions: sizes of the generated region grids")  # fmt: skip
    p.add_argument("--regions-scene", type=Path,
                   default=Path("../shared/data/geotiff/rgbn.tif"),
                   help="regions: the real scene the raster is a mosaic of")  # fmt: skip
    p.add_argument("--speed-config", default="mbt_mid",
                   help="speed: the variant whose fold models are measured")  # fmt: skip
    p.add_argument("--speed-settings", nargs="+", default=list(MEASURED),
                   help="speed: settings (exact, fast, or options joined by +: tome16+int8, "
                   "bf16, compile)")  # fmt: skip
    p.add_argument("--speed-rows", type=int, default=128,
                   help="speed: held-out rows timed per call")  # fmt: skip
    p.add_argument("--urfc-regions", type=int, nargs="+", default=[10_000, 100_000],
                   help="sizes of the generated URFC sets")  # fmt: skip
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the generated URFC data (default: a temporary folder), the speed "
        "part's fold models (default: runs/bench_speed/CONFIG) and the regions part's raster, "
        "grids and model (default: runs/bench_regions)",
    )


def _bench(args: argparse.Namespace) -> int:
    from fusion.bench.data import run_data_bench
    from fusion.bench.models import BenchSettings, run_bench

    if "speed" in args.parts:
        from fusion.bench.speed import run_speed_bench
        from fusion.configs import config_files

        run_speed_bench(
            args.output, config_files(args.speed_config), Path(args.series),
            args.work or Path("runs/bench_speed") / args.speed_config,
            settings=args.speed_settings,
            rows=args.speed_rows, device=args.device, threads=args.threads or None,
        )  # fmt: skip
        print((args.output / "speed.md").read_text())
    if "regions" in args.parts:
        from fusion.bench.regions import run_regions_bench

        run_regions_bench(
            args.output, args.regions_scene, args.work or Path("runs/bench_regions"),
            counts=tuple(args.regions_counts),
        )  # fmt: skip
        print((args.output / "regions.md").read_text())
    if "urfc" in args.parts:
        from fusion.bench.urfc import run_urfc_bench

        data = Path(args.manifest).parents[1]  # the data bundle: aid/, footfall/
        run_urfc_bench(
            args.output, sizes=tuple(args.urfc_regions), aid=data / "aid",
            counts=Path(args.series), work=args.work,
        )  # fmt: skip
        print((args.output / "urfc.md").read_text())
    if "models" in args.parts:
        settings = BenchSettings(
            batch_size=args.batch_size, image_size=args.image_size, hours=args.hours,
            repeats=args.repeats, device=args.device, threads=args.threads or None,
        )  # fmt: skip
        models = run_bench(args.output, settings, quick=args.quick)
        print((args.output / "summary.md").read_text())
    if "data" in args.parts:
        if "models" not in args.parts:  # the training speed of the last model table
            import pandas as pd

            models = pd.read_csv(args.output / "results.csv")
        train_sps = float(models.set_index("variant").loc["mbt_mid", "train_sps"])
        run_data_bench(
            args.output, manifest=args.manifest, series=args.series, train_sps=train_sps,
            rows=0 if args.quick else args.series_rows, image_size=args.image_size,
        )  # fmt: skip
        print((args.output / "data.md").read_text())
    return 0


def _experiment_parsers(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--folds", type=int, default=5, help="place-grouped folds (K >= 2)")
    common.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="repeats of the cross-validation; repeat r reshuffles folds, inner split, order and "
        "initialisation with seed r",
    )
    common.add_argument("--output", required=True, type=Path, help="results folder")
    common.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="after --: settings passed to every run, e.g. -- --trainer.max_epochs 5",
    )
    p = sub.add_parser(
        "ablate",
        parents=[common],
        help="cross-validate each MBT fusion depth on held-out places",
    )
    p.add_argument(
        "--config", required=True, help="a variant (configs/variants/NAME.yaml) or a YAML path"
    )
    p.add_argument("--depths", nargs="+", default=["early", "mid", "late"])
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="cross-validate models on held-out places, against a baseline and image-only model",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        required=True,
        help="variants (configs/variants/NAME.yaml, read over configs/base.yaml) or YAML paths",
    )
    p.add_argument("--baseline", default="bilstm", help="series-only baseline (always run)")
    p.add_argument("--reference", default="vit", help="image-only model compared with (if run)")
    p = sub.add_parser(
        "calibrate",
        help="recalibrate a checkpoint's prediction sets on a cross-validation's held-out rows",
        description="Writes OUTPUT: CKPT with the conformal calibration (fusion.conformal) of "
        "the out-of-fold rows of SETTING in OOF (oof_predictions.csv.gz of fusion compare, "
        "every repeat; each place counting once) instead of its val places' own: more places "
        "per class, so fusion predict --coverage covers closer to what it is asked. The "
        "cross-validation should be of the checkpoint's config.",
    )
    p.add_argument("--ckpt_path", "--ckpt-path", required=True, type=Path)
    p.add_argument("--oof", required=True, type=Path, help="oof_predictions.csv.gz")
    p.add_argument("--setting", required=True, help="the setting's name in OOF, e.g. mbt_mid")
    p.add_argument("--output", required=True, type=Path, help="the calibrated checkpoint")
    p = sub.add_parser("report", help="write the README's Results section from result folders")
    p.add_argument("--ablation", type=Path)
    p.add_argument("--compare", type=Path)
    p.add_argument("--readme", type=Path, default=Path("README.md"))


def _experiment(args: argparse.Namespace) -> int:
    from fusion import experiments

    overrides = [a for a in (getattr(args, "overrides", None) or []) if a != "--"]
    if args.command == "ablate":
        args.output.mkdir(parents=True, exist_ok=True)
        experiments.ablate(
            args.config, args.depths, args.folds, args.repeats, args.output, overrides
        )
        print((args.output / "summary.md").read_text())
    elif args.command == "compare":
        args.output.mkdir(parents=True, exist_ok=True)
        experiments.compare(
            args.configs, args.folds, args.repeats, args.output, baseline=args.baseline,
            reference=args.reference, overrides=overrides,
        )  # fmt: skip
        print((args.output / "summary.md").read_text())
    elif args.command == "calibrate":
        done = experiments.calibrate_checkpoint(args.ckpt_path, args.oof, args.setting, args.output)
        thresholds = ", ".join(f"{t:.3f}" for t in done.thresholds(experiments.SET_COVERAGE))
        print(
            f"calibrated on {len(done.scores)} out-of-fold rows of {done.n_places} places "
            f"(thresholds at {experiments.SET_COVERAGE:.0%}: {thresholds}); wrote {args.output}"
        )
    else:
        experiments.write_readme_results(args.readme, args.ablation, args.compare)
        print(f"updated the Results section of {args.readme}")
    return 0


def _urfc(args: argparse.Namespace) -> int:
    from fusion.data.urfc import convert_urfc

    done = convert_urfc(
        args.root, args.output, regular_days=args.regular_days, on_error=args.on_error,
        workers=args.workers,
    )  # fmt: skip
    rate = done.areas / max(done.seconds, 1e-9)
    print(f"wrote {done.manifest} and {done.activity} ({done.areas} regions, "
          f"{done.seconds:.1f} s, {rate:.0f} files/s)")  # fmt: skip
    if done.report is not None:
        print(f"skipped {len(done.skipped)} problems, listed in {done.report}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from fusion.data.datamodule import FusionDataModule
    from fusion.data.overview import inspect

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


def main(argv: list[str] | None = None) -> int:
    """Run a command; an input problem ends with one ``error:`` line (exit 2), Ctrl-C with one
    ``interrupted`` line (exit 130), never with a traceback."""
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else argv
    console = Console(stderr=True)
    # Lightning answers Ctrl-C during fit/validate/test with its own graceful shutdown and
    # sys.exit(1); this flag tells that exit from the others.
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    # Only Python's usual Ctrl-C handler is replaced (an ignored SIGINT stays ignored).
    previous = signal.getsignal(signal.SIGINT)
    catch = (
        previous is signal.default_int_handler
        and threading.current_thread() is threading.main_thread()
    )
    if catch:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from fusion.training import build_cli

            build_cli(argv)
            return 0
        parser = argparse.ArgumentParser(
            prog="fusion",
            description="Urban functional-zone classification from tiles + activity series. "
            f"Training and evaluation: fusion {{{','.join(LIGHTNING_COMMANDS)}}} --config FILE.",
        )
        sub = parser.add_subparsers(dest="command", required=True)
        _data_parser(sub)
        _predict_parser(sub)
        _explain_parser(sub)
        _bench_parser(sub)
        _experiment_parsers(sub)
        args = parser.parse_args(argv)
        if args.command == "predict":
            return _predict(args, sub.choices["predict"])
        if args.command == "explain":
            return _explain(args, sub.choices["explain"])
        if args.command == "bench":
            return _bench(args)
        if args.command == "data":
            return _urfc(args) if args.data_command == "urfc" else _inspect(args)
        return _experiment(args)
    except (InputError, InputErrors) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2
    except ValueError as err:
        # jsonargparse wraps what the datamodule raises while the CLI instantiates it.
        cause = err.__cause__
        while cause is not None and not isinstance(cause, (InputError, InputErrors)):
            cause = cause.__cause__
        if cause is None:
            raise
        console.print(f"[bold red]error:[/] {cause}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        return 130
    except SystemExit:
        if not interrupted:
            raise
        console.print("interrupted", highlight=False)
        return 130
    finally:
        if catch:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
