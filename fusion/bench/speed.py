"""Speed against accuracy of the frozen ViT's inference options (:mod:`fusion.speed`).

For each setting (``exact``, ``int8``, ``bf16``, ``tome16``, ``tome16+int8`` ...; with
``px<N>``, e.g. ``px168+bf16``, the models are the config's trained on ``N`` px tiles, fewer ViT
tokens, on the same folds: :func:`bench_setting`):

- **Accuracy**: macro-F1 on held-out places. A place-grouped K-fold split of the benchmark (the
  split of ``fusion compare``'s repeat 0) trains one model per fold (the config's, stage 1,
  ``--refit false``; kept under ``work/``, trained once); each fold's model predicts its
  held-out rows through :func:`fusion.predict.predict` with the setting, and macro-F1 is
  computed on the pooled rows (:func:`fusion.metrics.macro_f1`). The settings change nothing
  the held-out rows could have chosen: the models are trained once, with the exact ViT.
- **Speed**: samples/s of the whole ``fusion predict`` path (tiles read, series windows built,
  ViT, fusion, CSV written) on ``rows`` held-out rows of fold 0, and of the bare timm ViT
  (fp32, its forward alone on the same tiles, already decoded): every setting and the bare ViT
  once per round, rounds interleaved, the median of ``rounds`` rounds.

Writes ``speed.csv``, ``speed.md`` and ``speed.png`` (the trade-off) to the output folder.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from fusion.bench.build import timm_floor
from fusion.bench.timing import sync, torch_threads
from fusion.configs import config_args
from fusion.data.prediction import ManifestSamples, PredictionDataModule
from fusion.errors import InputError
from fusion.io import atomic_path
from fusion.metrics import macro_f1
from fusion.plots import save_figure
from fusion.predict import load_model, predict
from fusion.speed import MEASURED, Speed, apply_speed, parse_speed
from fusion.training import build_cli

MANIFEST_COLUMNS = ["sample_id", "image", "sensor_id", "start", "hours", "label"]


@dataclass(frozen=True)
class FoldModel:
    """A fold's trained model and its held-out rows as a manifest (absolute image paths)."""

    ckpt: Path
    held_out: Path


def fold_models(
    configs: Sequence[Path], folds: int, work: Path, overrides: Sequence[str] = ()
) -> list[FoldModel]:
    """Train (once: an existing ``work/foldK`` is reused) each fold's model on the other
    folds' places, with the split of ``fusion compare``'s repeat 0."""
    spec = {"configs": [str(c) for c in configs], "folds": folds, "overrides": list(overrides)}
    written = work / "spec.json"
    if written.is_file() and json.loads(written.read_text()) != spec:
        raise InputError(
            f"holds fold models of {written.read_text().strip()}, not of {json.dumps(spec)}: "
            "use another --work folder", file=written,
        )  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    written.write_text(json.dumps(spec))
    out = []
    for fold in range(folds):
        folder = work / f"fold{fold}"
        model = FoldModel(folder / "checkpoints" / "last.ckpt", folder / "held_out.csv")
        if not (model.ckpt.is_file() and model.held_out.is_file()):
            args = [
                *config_args(configs), "--refit", "false", *overrides,
                "--data.folds", str(folds), "--data.fold", str(fold), "--data.seed", "0",
                "--seed_everything", "0", "--trainer.default_root_dir", str(folder),
                "--trainer.logger", "false",
            ]  # fmt: skip
            cli = build_cli(args, run=False)
            cli.trainer.fit(cli.model, cli.datamodule)
            dm = cli.datamodule
            rows = np.flatnonzero(dm.splits == "test")
            held = dm.frame.iloc[rows][MANIFEST_COLUMNS].copy()
            held["image"] = [str(Path(dm.image_paths[i]).resolve()) for i in rows]
            with atomic_path(model.held_out) as tmp:
                held.to_csv(tmp, index=False)
        out.append(model)
    return out


def bench_setting(name: str) -> tuple[int | None, Speed]:
    """A bench setting: prediction options (:func:`~fusion.speed.parse_speed`), optionally with
    ``px<N>`` (``px154+bf16``): fold models trained on ``N`` px tiles instead of the config's
    (a model setting, not a prediction option: those models are trained for it)."""
    parts = name.split("+")
    sizes = [int(p[2:]) for p in parts if p.startswith("px") and p[2:].isdigit()]
    if len(sizes) > 1:
        raise ValueError(f"more than one tile size in '{name}'")
    rest = "+".join(p for p in parts if not (p.startswith("px") and p[2:].isdigit()))
    return (sizes[0] if sizes else None), parse_speed(rest or "exact")


def _predict(
    task: object,
    contract: object,
    manifest: Path,
    speed: Speed,
    series: Path,
    device: str,
    output: Path,
) -> pd.DataFrame:
    """A loaded model's predictions of ``manifest``'s rows with ``speed``: the ``fusion
    predict`` path from the manifest to the CSV."""
    samples = ManifestSamples(manifest, contract, series=series)
    predict(task, PredictionDataModule(samples, batch_size=32), output, device=device,
            speed=speed)  # fmt: skip
    return pd.read_csv(output)


def held_out_scores(
    models: Sequence[FoldModel], speed: Speed, series: Path, device: str, work: Path
) -> dict[str, float]:
    """Macro-F1 and accuracy of ``speed`` on the pooled held-out rows of every fold."""
    frames = []
    for i, model in enumerate(models):
        task, contract = load_model(model.ckpt)
        out = _predict(task, contract, model.held_out, speed, series, device, work / f"{i}.csv")
        frames.append(out.assign(label=pd.read_csv(model.held_out)["label"]))
    pooled = pd.concat(frames, ignore_index=True)
    classes = sorted(set(pooled["label"]))
    index = {c: k for k, c in enumerate(classes)}
    labels = pooled["label"].map(index).to_numpy()
    preds = pooled["pred"].map(index).fillna(-1).to_numpy(dtype=int)  # -1: a class not true
    return {
        "macro_f1": macro_f1(labels, np.where(preds < 0, len(classes), preds), len(classes) + 1),
        "accuracy": float((labels == preds).mean()),
        "rows": len(pooled),
        "sensors": int(pooled["sensor_id"].nunique()),
    }


def _tiles(model: FoldModel, series: Path, rows: int) -> tuple[int, list[torch.Tensor]]:
    """The tile size and the first ``rows`` held-out tiles of ``model``, decoded and normalised
    as the predict path gives them to the ViT, in batches of 32."""
    _, contract = load_model(model.ckpt)
    data = PredictionDataModule(ManifestSamples(model.held_out, contract, series=series), 32)
    data.setup("predict")
    batches: list[torch.Tensor] = []
    for batch in data.predict_dataloader():
        batches.append(batch["image"][: rows - sum(len(b) for b in batches)])
        if sum(len(b) for b in batches) >= rows:
            break
    return contract.image_size, batches


def run_speed_bench(
    output: Path, configs: Sequence[Path], series: Path, work: Path, *,
    settings: Sequence[str] = MEASURED, folds: int = 5, rows: int = 128, rounds: int = 3,
    device: str = "cpu", threads: int | None = None, overrides: Sequence[str] = (),
) -> pd.DataFrame:  # fmt: skip
    """Measure every setting (see the module docstring); write ``speed.csv``, ``speed.md`` and
    ``speed.png`` to ``output``."""
    speeds = {name: bench_setting(name) for name in settings}
    if "exact" not in speeds:
        speeds = {"exact": bench_setting("exact"), **speeds}
    models = {None: fold_models(configs, folds, work, overrides)}
    for size in sorted({size for size, _ in speeds.values() if size is not None}):
        models[size] = fold_models(
            configs, folds, work / f"px{size}", [*overrides, "--data.image_size", str(size)]
        )
    with torch_threads(threads):
        scores = {}
        for name, (size, speed) in speeds.items():
            start = time.perf_counter()
            scores[name] = held_out_scores(
                models[size], speed, series, device, work / "predictions"
            )
            print(f"{name}: macro-F1 {scores[name]['macro_f1']:.4f} on {scores[name]['rows']} "
                  f"held-out rows ({time.perf_counter() - start:.0f} s)")  # fmt: skip
        firsts = {size: fold[0] for size, fold in models.items()}
        seconds = _interleaved(firsts, speeds, series, device, rows, rounds)
    frame = _table(speeds, scores, seconds, rows)
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "speed.csv") as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(output / "speed.md") as tmp:
        tmp.write_text(_markdown(frame, folds, rows, rounds, device, threads))
    save_figure(_plot(frame), output / "speed.png")
    return frame


def _interleaved(
    models: dict[int | None, FoldModel], speeds: dict[str, tuple[int | None, Speed]],
    series: Path, device: str, rows: int, rounds: int,
) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per round of the bare ViT (at the config's tile size) and of each setting's
    predict path (its fold-0 model) on the same ``rows`` rows; one untimed call each first (a
    compiled setting compiles there)."""
    image_size, batches = _tiles(models[None], series, rows)
    vit = timm_floor(image_size).to(device)
    manifest = models[None].held_out.with_name(f"first{rows}.csv")
    pd.read_csv(models[None].held_out).head(rows).to_csv(manifest, index=False)

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                vit(batch.to(device))
        sync(device)

    times: dict[str, list[float]] = {"timm_vit": [], **{name: [] for name in speeds}}
    with tempfile.TemporaryDirectory() as tmp:
        for timed in [False] + [True] * rounds:
            for name in times:
                if name == "timm_vit":
                    start = time.perf_counter()
                    bare()
                else:
                    size, speed = speeds[name]
                    task, contract = load_model(models[size].ckpt)
                    apply_speed(task.net, speed, "cpu" if device == "cpu" else "gpu")
                    start = time.perf_counter()
                    _predict(task, contract, manifest, speed, series, device,
                             Path(tmp) / "p.csv")  # fmt: skip
                if timed:
                    times[name].append(time.perf_counter() - start)
    return times


def _table(
    speeds: dict[str, tuple[int | None, Speed]], scores: dict[str, dict[str, float]],
    seconds: dict[str, list[float]], rows: int,
) -> pd.DataFrame:  # fmt: skip
    rate = {name: rows / statistics.median(times) for name, times in seconds.items()}
    records = [{"setting": "timm_vit", "samples_per_s": rate["timm_vit"]}]
    for name, (size, speed) in speeds.items():
        records.append({
            "setting": name, "image_size": size, "merge": speed.merge, "int8": speed.int8,
            "bf16": speed.bf16, "compile": speed.compile, "samples_per_s": rate[name],
            **scores[name],
        })  # fmt: skip
    frame = pd.DataFrame(records)
    frame["x_timm_vit"] = frame["samples_per_s"] / rate["timm_vit"]
    frame["x_exact"] = frame["samples_per_s"] / rate["exact"]
    exact = scores["exact"]["macro_f1"]
    frame["macro_f1_points"] = (frame["macro_f1"] - exact) * 100
    return frame


def _markdown(
    frame: pd.DataFrame, folds: int, rows: int, rounds: int, device: str, threads: int | None
) -> str:
    first = frame.dropna(subset=["macro_f1"]).iloc[0]
    lines = [
        "# Prediction speed against accuracy (`fusion bench --parts speed`)",
        "",
        f"Speed: samples/s of the whole `fusion predict` path on {rows} held-out rows (tiles "
        "read, series windows, ViT, fusion, CSV written; the checkpoint loaded and the setting "
        "applied before the clock starts) and of the bare fp32 timm ViT's forward on the same "
        "decoded tiles; "
        f"median of {rounds} interleaved rounds after one untimed; device {device}, torch "
        f"threads {threads or torch.get_num_threads()}. Accuracy: macro-F1 on "
        f"{int(first['rows'])} held-out rows of {int(first['sensors'])} sensors (place-grouped "
        f"{folds}-fold split, one model per fold trained once with the exact ViT; the setting "
        "applied at prediction only; `pxN`: a model per fold of the same split trained on N px "
        "tiles instead, the bare ViT staying at the config's size).",
        "",
        "| setting | samples/s | x bare ViT | x exact | macro-F1 | vs exact (points) | OA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in frame.itertuples(index=False):
        if row.setting == "timm_vit":
            lines.append(f"| bare timm ViT (fp32, forward only) | {row.samples_per_s:.1f} | "
                         "1.00 | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {row.setting} | {row.samples_per_s:.1f} | {row.x_timm_vit:.2f} | "
            f"{row.x_exact:.2f} | {row.macro_f1:.3f} | {row.macro_f1_points:+.1f} | "
            f"{row.accuracy:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(frame: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = frame.dropna(subset=["macro_f1"])
    ax.scatter(rows["x_timm_vit"], rows["macro_f1"], color="tab:blue")
    for row in rows.itertuples(index=False):
        ax.annotate(row.setting, (row.x_timm_vit, row.macro_f1), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)  # fmt: skip
    exact = rows.loc[rows["setting"] == "exact", "macro_f1"].item()
    ax.axhline(exact - 0.01, color="grey", ls="--", lw=0.8, label="exact - 1 point")
    ax.axvline(2.0, color="grey", ls=":", lw=0.8, label="2x the bare ViT")
    ax.set_xlabel("end-to-end predict throughput / bare fp32 timm ViT")
    ax.set_ylabel("macro-F1, held-out places")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
