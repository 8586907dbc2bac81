"""The experiments users run: fusion-depth ablation and model comparison, over seeds.

Each run trains a config, tests its best checkpoint and leaves ``result.json`` (metrics, cost,
confusion matrix) and ``predictions_test.csv`` in its own folder; a folder with ``result.json`` is
finished and is never trained again, so repeating a command resumes it. Checkpoints are deleted
once a run is tested: result folders stay small enough to commit.

Outputs per experiment: ``results.csv`` (a row per run), ``summary.md`` (mean ± std) and plots.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fusion.io import atomic_path
from fusion.metrics import draw_confusion
from fusion.plots import save_figure

METRICS = ("OA", "macro_f1", "kappa")


@dataclass
class RunSpec:
    """One training run: a config, a seed and CLI overrides (``--key value`` pairs)."""

    config: Path
    seed: int
    overrides: list[str] = field(default_factory=list)


def run_once(spec: RunSpec, folder: Path) -> dict[str, Any]:
    """Fit, test the best checkpoint, and record the run in ``folder/result.json``.

    Returns the recorded result; a folder that already has one is returned as is (resume).
    """
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    from fusion.cli import build_cli

    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run starts over
    folder.mkdir(parents=True)
    cli = build_cli(
        [
            "--config", str(spec.config), *spec.overrides,
            "--seed_everything", str(spec.seed),
            "--trainer.default_root_dir", str(folder),
            "--trainer.logger", "false",
            "--trainer.callbacks.dirpath", str(folder / "checkpoints"),
        ],
        run=False,
    )  # fmt: skip
    trainer, task, dm = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(task, dm)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.test(task, dm, ckpt_path="best", weights_only=True, verbose=False)[0]
    test_seconds = time.perf_counter() - start
    n_test = len(task.test_predictions)
    fusion = task.net.fusion
    result = {
        "config": str(spec.config),
        "seed": spec.seed,
        "overrides": spec.overrides,
        **{m: float(metrics[f"test/{m}"]) for m in METRICS},
        **{f"f1_{c}": float(metrics[f"test/f1/{c}"]) for c in task.classes},
        "fusion_layer": getattr(fusion, "fusion_layer", None),
        "parameters": sum(p.numel() for p in task.net.parameters()),
        "trainable_parameters": sum(p.numel() for p in task.net.parameters() if p.requires_grad),
        "train_seconds": round(train_seconds, 1),
        "test_samples": n_test,
        "inference_samples_per_s": round(n_test / test_seconds, 1),
        "classes": task.classes,
        "confusion": task.test_confusion.tolist(),
    }
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    _write_atomic(result_file, json.dumps(result, indent=1))
    return result


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _table(rows: list[dict[str, Any]], key: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows).drop(columns=["confusion", "classes", "overrides"])
    return frame[[key, *[c for c in frame.columns if c != key]]]


def summarize(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Mean and std over seeds of the metrics and costs, one row per ``key`` value (in order)."""
    columns = [*METRICS, "train_seconds", "inference_samples_per_s"]
    order = list(dict.fromkeys(frame[key]))
    grouped = frame.groupby(key, sort=False)[columns]
    mean, std = grouped.mean().loc[order], grouped.std(ddof=1).fillna(0.0).loc[order]
    out = pd.DataFrame(index=pd.Index(order, name=key))
    for c in columns:
        out[c] = mean[c]
        out[f"{c}_std"] = std[c]
    out["seeds"] = frame.groupby(key, sort=False).size().loc[order]
    out["parameters"] = frame.groupby(key, sort=False)["parameters"].first().loc[order]
    return out


def summary_markdown(summary: pd.DataFrame, title: str) -> str:
    """A markdown table of ``mean ± std``."""
    key = summary.index.name
    lines = [
        f"## {title}",
        "",
        f"| {key} | OA | macro-F1 | kappa | train s | test samples/s | parameters | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.iterrows():
        cells = [f"{r[c]:.3f} ± {r[f'{c}_std']:.3f}" for c in METRICS]
        cells += [f"{r['train_seconds']:.0f}", f"{r['inference_samples_per_s']:.0f}"]
        cells += [f"{int(r['parameters']):,}", str(int(r["seeds"]))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(frame: pd.DataFrame, key: str, path: Path, title: str) -> Path:
    """Macro-F1 and OA per ``key`` value: mean with std error bars, each seed as a dot."""
    order = list(dict.fromkeys(frame[key]))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(order), 3.8), sharey=True)
    for ax, metric in zip(axes, ("macro_f1", "OA"), strict=True):
        values = [frame.loc[frame[key] == k, metric].to_numpy() for k in order]
        means = [v.mean() for v in values]
        stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
        x = np.arange(len(order))
        ax.bar(x, means, yerr=stds, capsize=5, color="tab:blue", alpha=0.6)
        for i, v in enumerate(values):
            ax.scatter(np.full(len(v), i), v, color="black", s=12, zorder=3)
        ax.set_xticks(x, order, rotation=30 if len(order) > 3 else 0, ha="right")
        ax.set_title(metric.replace("_", "-"))
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------- ablation
def ablate(
    config: Path,
    depths: Sequence[str],
    seeds: int,
    output: Path,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Train and test each fusion depth with each seed.

    Writes ``results.csv``, ``summary.md`` and ``ablation.png`` into ``output``.
    """
    rows = []
    for depth in depths:
        for seed in range(seeds):
            spec = RunSpec(config, seed, [*overrides, "--model.net.fusion_layer", depth])
            rows.append({"depth": depth, **run_once(spec, output / "runs" / f"{depth}-seed{seed}")})
    frame = _table(rows, "depth")
    frame.to_csv(output / "results.csv", index=False)
    summary = summarize(frame, "depth")
    layers = frame.groupby("depth", sort=False)["fusion_layer"].first()
    text = summary_markdown(summary, f"Fusion-depth ablation ({config.name}, {seeds} seeds)")
    text += "\nFirst fused layer per depth: " + ", ".join(
        f"{d} = {int(v)}" for d, v in layers.items()
    )
    _write_atomic(output / "summary.md", text + "\n")
    plot_metric(frame, "depth", output / "ablation.png", f"Fusion depth ({config.stem})")
    return frame


# ---------------------------------------------------------------------- comparison
def macro_f1(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over classes that occur as label or prediction (as torchmetrics computes it)."""
    confusion = np.bincount(labels * n_classes + preds, minlength=n_classes**2)
    confusion = confusion.reshape(n_classes, n_classes)
    tp = np.diag(confusion).astype(float)
    fp, fn = confusion.sum(axis=0) - tp, confusion.sum(axis=1) - tp
    seen = tp + fp + fn > 0
    return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


def bootstrap_difference(
    model: Sequence[pd.DataFrame],
    baseline: Sequence[pd.DataFrame],
    classes: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Macro-F1 of ``model`` minus ``baseline``, averaged over seeds: (mean, 2.5%, 97.5%).

    Each resample draws test rows with replacement and scores every seed's predictions of both
    models on the same rows, so the interval reflects test-set sampling; seeds are paired in order.
    """
    index = {c: i for i, c in enumerate(classes)}

    def codes(frame: pd.DataFrame, column: str) -> np.ndarray:
        return frame.sort_values("row")[column].map(index).to_numpy()

    labels = codes(model[0], "label")
    pairs = [(codes(m, "pred"), codes(b, "pred")) for m, b in zip(model, baseline, strict=True)]
    k = len(classes)

    def diff(rows: np.ndarray) -> float:
        return float(np.mean([
            macro_f1(labels[rows], m[rows], k) - macro_f1(labels[rows], b[rows], k)
            for m, b in pairs
        ]))  # fmt: skip

    rng = np.random.default_rng(seed)
    draws = [diff(rng.integers(0, len(labels), len(labels))) for _ in range(n_boot)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return diff(np.arange(len(labels))), float(low), float(high)


def compare(
    configs: Sequence[str],
    seeds: int,
    output: Path,
    baseline: str = "bilstm",
    config_dir: Path = Path("configs"),
    overrides: Sequence[str] = (),
    n_boot: int = 1000,
) -> pd.DataFrame:
    """Train and test each config with each seed; write results.csv, summary.md, compare.png,
    confusion.png, and each model against ``baseline`` (per-seed differences, bootstrap CI)."""
    names = [baseline, *[c for c in configs if c != baseline]]
    rows = []
    for name in names:
        config = Path(name) if name.endswith(".yaml") else config_dir / f"{name}.yaml"
        for seed in range(seeds):
            folder = output / "runs" / f"{Path(name).stem}-seed{seed}"
            rows.append(
                {
                    "model": Path(name).stem,
                    **run_once(RunSpec(config, seed, list(overrides)), folder),
                }
            )
    frame = _table(rows, "model")
    frame.to_csv(output / "results.csv", index=False)
    summary = summarize(frame, "model")
    text = summary_markdown(summary, f"Model comparison ({seeds} seeds)")
    text += "\n" + _versus_baseline(frame, output, Path(baseline).stem, n_boot)
    _write_atomic(output / "summary.md", text)
    plot_metric(frame, "model", output / "compare.png", "Models (mean ± std over seeds)")
    _plot_confusions(rows, output / "confusion.png")
    return frame


def _versus_baseline(frame: pd.DataFrame, output: Path, baseline: str, n_boot: int) -> str:
    classes = json.loads((next((output / "runs").glob("*/result.json"))).read_text())["classes"]

    def predictions(model: str) -> list[pd.DataFrame]:
        seeds = sorted(frame.loc[frame["model"] == model, "seed"])
        return [
            pd.read_csv(output / "runs" / f"{model}-seed{s}" / "predictions_test.csv")
            for s in seeds
        ]

    base = predictions(baseline)
    base_f1 = frame[frame["model"] == baseline].sort_values("seed")["macro_f1"].to_numpy()
    lines = [
        f"## Against the {baseline} baseline (macro-F1 difference on the test rows)",
        "",
        "| model | per-seed difference | mean | bootstrap 95% interval |",
        "|---|---|---|---|",
    ]
    for model in dict.fromkeys(frame["model"]):
        if model == baseline:
            continue
        f1 = frame[frame["model"] == model].sort_values("seed")["macro_f1"].to_numpy()
        per_seed = ", ".join(f"{d:+.3f}" for d in f1 - base_f1)
        mean, low, high = bootstrap_difference(predictions(model), base, classes, n_boot)
        lines.append(f"| {model} | {per_seed} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] |")
    return "\n".join(lines) + "\n"


def _plot_confusions(rows: list[dict[str, Any]], path: Path) -> Path:
    """Confusion matrices side by side, one per model, summed over seeds."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    classes = rows[0]["classes"]
    fig, axes = plt.subplots(1, len(models), figsize=(2.2 + 2.6 * len(models), 3.8))
    for k, (ax, model) in enumerate(zip(np.atleast_1d(axes), models, strict=True)):
        matrix = sum(np.array(r["confusion"]) for r in rows if r["model"] == model)
        draw_confusion(ax, matrix, classes, model, class_labels_y=k == 0)
    fig.supxlabel("predicted", fontsize=9)
    fig.supylabel("true", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------- README
RESULTS_START = "<!-- results:start (written by `fusion report`) -->"
RESULTS_END = "<!-- results:end -->"


def write_readme_results(readme: Path, ablation: Path | None, comparison: Path | None) -> str:
    """Replace the README's Results section with the experiments' summaries and plots."""
    root = readme.resolve().parent
    parts = [
        "## Results",
        "",
        "Real AID aerial tiles and real hourly pedestrian counts (Melbourne, Auckland), "
        "**paired by label only**: image and series of a sample come from different places, so "
        "these numbers measure class evidence from each view, not co-located cross-modal cues. "
        "Test rows are the validation rows of the split named in each config (place-disjoint: "
        "sensors unseen in training). Mean ± std over seeds; CPU, frozen ViT.",
        "",
    ]
    for folder, images in (
        (comparison, ("compare.png", "confusion.png")),
        (ablation, ("ablation.png",)),
    ):
        if folder is None:
            continue
        summary = (folder / "summary.md").read_text().replace("\n## ", "\n### ")
        parts += [summary.replace("## ", "### ", 1).rstrip(), ""]
        for image in images:
            rel = (folder / image).resolve().relative_to(root)
            parts += [f"![{image}]({rel.as_posix()})", ""]
        parts += [f"Per-run rows: `{(folder / 'results.csv').resolve().relative_to(root)}`.", ""]
    section = "\n".join([RESULTS_START, *parts, RESULTS_END])
    text = readme.read_text()
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + section + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    _write_atomic(readme, text)
    return section
