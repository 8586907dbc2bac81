"""The experiments users run: model comparison and fusion-depth ablation, judged by place-grouped
cross-validation.

Protocol. The places (series keys, or groups of nearby sensors) are dealt into ``K`` folds,
stratified by label (:func:`fusion.data.splits.group_folds`). For each fold, a model is trained on
the other folds' places for a fixed number of epochs: an inner place-disjoint split of those places
weighs its heads (the softmax temperature, for one head), then it is refitted on all of them
(``refit``), and it predicts the held-out fold once. Pooled over the folds, every row of
an evaluable class is predicted exactly once per repeat by a model that never saw its place
(out-of-fold, OOF). Repeat ``r`` reshuffles the folds, the inner split, the training order and the
initialisation (all seeded by ``r``). Labels with a single place cannot be held out: they are
always trained on and reported as not evaluable on new places.

Each (setting, repeat, fold) run leaves ``result.json`` and ``predictions.csv`` in its own folder;
a folder with ``result.json`` is finished and is never trained again, so repeating a command
resumes it. Checkpoints are deleted once a run is tested: result folders stay small enough to
commit.

Outputs: ``results.csv`` (a row per run), ``oof_predictions.csv.gz`` (the pooled OOF predictions
per setting and repeat), ``summary.md`` (mean ± std over repeats of the pooled OOF metrics, and
cluster-bootstrap intervals of differences) and plots.
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
import torch

from fusion.calibration import (
    calibrated_probabilities,
    calibration_errors,
    expected_calibration_error,
)
from fusion.configs import CONFIG_DIR, config_args, config_files
from fusion.conformal import ConformalCalibration, coverage_table, set_names
from fusion.errors import InputError
from fusion.io import atomic_path
from fusion.metrics import SCALARS, confusion_matrix, draw_confusion, macro_f1, scores
from fusion.ood import FLAG_RATE, unfamiliar
from fusion.plots import save_figure
from fusion.predict import checkpoint_contract, read_checkpoint
from fusion.task import IMAGE_HEAD, VIEWS
from fusion.training import build_cli, refit

OOF_FILE = "oof_predictions.csv.gz"
LINEAR_PROBE = "linear_probe"
SET_COVERAGE = 0.9  # the coverage of the conformal prediction sets the experiments score


@dataclass
class RunSpec:
    """One training run: config files (read in order), CLI overrides (``--key value`` pairs)
    and its place in the cross-validation (``repeat`` seeds the folds, inner split, order and
    initialisation). ``kind``: ``"lightning"`` (train the config's model) or ``"linear_probe"``
    (a logistic regression on the frozen ViT features of the config's data,
    :mod:`fusion.linear_probe`)."""

    configs: Sequence[Path]
    repeat: int
    fold: int
    folds: int
    overrides: list[str] = field(default_factory=list)
    kind: str = "lightning"


@dataclass
class Outcome:
    """What a run produced on its test rows, and what it cost."""

    predictions: pd.DataFrame  # row, label, pred, p_<class> (calibrated)
    ece: float
    ece_calibrated: float
    temperature: float
    parameters: int
    trainable_parameters: int
    token_seconds: float
    train_seconds: float
    test_seconds: float
    vit_tokens: str  # "cached" (frozen ViT tokens read from the cache) or "none"
    fusion_layer: int | None = None
    view_weights: dict[str, float] = field(default_factory=dict)  # each head's share
    # The conformal calibration of the inner val places (fusion.conformal), as saved.
    conformal: dict[str, list] | None = None


def run_once(spec: RunSpec, folder: Path) -> dict[str, Any]:
    """Fit on the training folds, test on the held-out fold, and record the run in
    ``folder/result.json`` and ``folder/predictions.csv``.

    Returns the recorded result; a folder that already has one is returned as is (resume).
    """
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run starts over
    folder.mkdir(parents=True)
    start = time.perf_counter()
    args = [
        *config_args(spec.configs), *spec.overrides,
        "--data.folds", str(spec.folds),
        "--data.fold", str(spec.fold),
        "--data.seed", str(spec.repeat),
        "--seed_everything", str(spec.repeat),
        "--trainer.default_root_dir", str(folder),  # checkpoints in folder/checkpoints
        "--trainer.logger", "false",
    ]  # fmt: skip
    cli = build_cli(args, run=False)
    setup_seconds = time.perf_counter() - start  # the data checked, windows and tiles read
    dm = cli.datamodule
    outcome = _probe(cli.model, dm) if spec.kind == LINEAR_PROBE else _train(cli, args)
    predictions = outcome.predictions
    rows = predictions["row"].to_numpy()
    predictions.insert(1, "sample_id", dm.frame["sample_id"].to_numpy()[rows])
    predictions.insert(2, "group", dm.groups[rows])
    predictions.insert(3, "fold", spec.fold)
    predictions["temperature"] = outcome.temperature
    classes = list(dm.classes.names)
    labels = np.array([classes.index(c) for c in predictions["label"]])
    preds = np.array([classes.index(c) for c in predictions["pred"]])
    confusion = confusion_matrix(labels, preds, len(classes))
    values = scores(confusion)
    result = {
        "config": " + ".join(str(path) for path in spec.configs),
        "kind": spec.kind,
        "repeat": spec.repeat,
        "fold": spec.fold,
        "folds": spec.folds,
        "overrides": spec.overrides,
        "test_rows": len(predictions),
        "test_places": int(predictions["group"].nunique()),
        **{m: values[m] for m in SCALARS},
        **_per_class(classes, values["f1_per_class"]),
        "ece": outcome.ece,
        "ece_calibrated": outcome.ece_calibrated,
        "temperature": outcome.temperature,
        **{f"weight_{name}": w for name, w in outcome.view_weights.items()},
        "fusion_layer": outcome.fusion_layer,
        "parameters": outcome.parameters,
        "trainable_parameters": outcome.trainable_parameters,
        "setup_seconds": round(setup_seconds, 1),
        "token_seconds": round(outcome.token_seconds, 1),
        "train_seconds": round(outcome.train_seconds, 1),
        "test_samples_per_s": round(len(predictions) / outcome.test_seconds, 1),
        "vit_tokens": outcome.vit_tokens,
        "classes": classes,
        "places_per_label": _places_per_label(dm),
        "single_place_labels": dm.single_place_labels,
        "confusion": confusion.tolist(),
        "conformal": outcome.conformal,
    }
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    with atomic_path(folder / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    _write_atomic(result_file, json.dumps(result, indent=1))
    return result


def _test_outputs(trainer: Any, task: Any, dm: Any) -> tuple[pd.DataFrame, torch.Tensor, float]:
    """The last checkpoint's outputs on the test rows (``Trainer.predict`` over the datamodule's
    held-out rows, the rows and outputs ``fusion test`` scores: those with a view the model
    reads): their predictions frame, pooled logits and the seconds taken."""
    from fusion.task import predictions_frame

    if trainer.world_size != 1:
        raise RuntimeError("the experiments predict on one device (trainer.devices: 1)")
    last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
    start = time.perf_counter()
    outputs = trainer.predict(task, dm, ckpt_path=last, weights_only=True)
    seconds = time.perf_counter() - start
    out = {k: torch.cat([o[k].cpu() for o in outputs]) for k in outputs[0]}
    kept = out["pred"] >= 0
    out = {k: v[kept] for k, v in out.items()}
    index = out["index"].numpy()
    views = {v: out[f"probs_{v}"].numpy() for v in VIEWS if f"probs_{v}" in out}
    frame = predictions_frame(
        index, dm.labels[index], out["probs"].numpy(), list(dm.classes.names), views
    )
    if task.ood is not None:  # the image expert's energy, thresholded on the inner val places
        head = task.net.head_names.index(IMAGE_HEAD)
        threshold = task.ood.threshold(FLAG_RATE)
        frame["image_energy"], frame["flagged"] = unfamiliar(out["heads"].numpy(), head, threshold)
    return frame, out["logits"], seconds


def _train(cli: Any, args: list[str]) -> Outcome:
    """Fit the config's model (and its refit on all training places, if the config asks), then
    predict the test rows with its last checkpoint."""
    trainer, task, dm = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(task, dm)
    token_seconds = dm.token_seconds
    if cli.config["refit"]:
        stage2 = refit(args, trainer, task, cli.config["data"]["inner_folds"])
        trainer, task, dm = stage2.trainer, stage2.model, stage2.datamodule
        token_seconds += dm.token_seconds
    train_seconds = time.perf_counter() - start - token_seconds
    predictions, logits, test_seconds = _test_outputs(trainer, task, dm)
    labels = torch.from_numpy(dm.labels[predictions["row"].to_numpy()])
    ece, ece_calibrated = calibration_errors(logits, labels, task.temperature.item())
    params = list(task.net.parameters())
    return Outcome(
        predictions=predictions,
        ece=ece,
        ece_calibrated=ece_calibrated,
        temperature=task.temperature.item(),
        parameters=sum(p.numel() for p in params),
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        token_seconds=token_seconds,
        train_seconds=train_seconds,
        test_seconds=test_seconds,
        vit_tokens="cached" if task.caches_image_tokens else "none",
        fusion_layer=getattr(task.net.fusion, "fusion_layer", None),
        view_weights=dict(zip(task.net.head_names, task.net.view_weights.tolist(), strict=True)),
        conformal=None if task.conformal is None else task.conformal.to_dict(),
    )


def _probe(task: Any, dm: Any) -> Outcome:
    """The linear probe on the frozen ViT features of ``task``'s image branch: fitted on the
    train rows, ``C`` and temperature chosen on the val rows, scored on the test rows."""
    from fusion.callbacks import attach_image_tokens
    from fusion.linear_probe import LinearProbe, probe_features
    from fusion.task import predictions_frame

    start = time.perf_counter()
    attach_image_tokens(task, dm)
    features = probe_features(torch.from_numpy(dm.image_tokens))
    token_seconds = dm.token_seconds
    k = len(dm.classes)
    rows = {name: np.flatnonzero(dm.splits == name) for name in ("train", "val", "test")}
    probe = LinearProbe.fit(features, dm.labels, rows["train"], rows["val"], k)
    train_seconds = time.perf_counter() - start - token_seconds
    start = time.perf_counter()
    test = rows["test"]
    logits = torch.from_numpy(probe.logits(features[test], k))
    probs = calibrated_probabilities(logits, probe.temperature).numpy()
    test_seconds = time.perf_counter() - start
    labels = torch.from_numpy(dm.labels[test])
    ece, ece_calibrated = calibration_errors(logits, labels, probe.temperature)
    size = probe.model.coef_.size + probe.model.intercept_.size
    return Outcome(
        predictions=predictions_frame(test, dm.labels[test], probs, list(dm.classes.names)),
        ece=ece,
        ece_calibrated=ece_calibrated,
        temperature=probe.temperature,
        parameters=sum(p.numel() for p in task.net.image_encoder.parameters()) + size,
        trainable_parameters=size,
        token_seconds=token_seconds,
        train_seconds=train_seconds,
        test_seconds=test_seconds,
        vit_tokens="cached",
    )


def _per_class(classes: Sequence[str], f1: np.ndarray) -> dict[str, float]:
    """``f1_<class>`` columns (NaN: the class is absent from the evaluated truth)."""
    return {f"f1_{c}": float(v) for c, v in zip(classes, f1, strict=True)}


def _places_per_label(dm: Any) -> dict[str, int]:
    """Distinct places (groups) per label over all rows of ``dm``."""
    frame = pd.DataFrame({"label": dm.frame["label"].to_numpy(), "group": dm.groups})
    return {str(k): int(v) for k, v in frame.groupby("label")["group"].nunique().items()}


def _write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------- running
@dataclass
class Setting:
    """A named thing to cross-validate: config files and the overrides that make it this
    setting (``kind`` as in :class:`RunSpec`)."""

    name: str
    configs: Sequence[Path]
    overrides: list[str] = field(default_factory=list)
    kind: str = "lightning"


def cross_validate(
    settings: Sequence[Setting], folds: int, repeats: int, output: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every (setting, repeat, fold) (resuming finished ones) and pool the held-out
    predictions. Returns ``results`` (a row per run) and the OOF frame (a row per setting, repeat
    and predicted row), and writes them as ``results.csv`` and ``oof_predictions.csv.gz``."""
    rows, parts = [], []
    for setting in settings:
        for repeat in range(repeats):
            folded = []
            for fold in range(folds):
                spec = RunSpec(
                    setting.configs, repeat, fold, folds, setting.overrides, setting.kind
                )
                folder = output / "runs" / setting.name / f"repeat{repeat}-fold{fold}"
                result = run_once(spec, folder)
                rows.append({"setting": setting.name, **result})
                part = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
                part = with_sets(part, result.get("conformal"), result["classes"])
                folded.append(part.assign(setting=setting.name, repeat=repeat))
            parts.extend(with_cross_fitted_sets(folded, result["classes"]))
    oof = pd.concat(parts, ignore_index=True)
    oof = oof[["setting", "repeat", *[c for c in oof.columns if c not in ("setting", "repeat")]]]
    check_oof(oof)
    results = pd.DataFrame(rows).drop(
        columns=[
            "confusion",
            "classes",
            "overrides",
            "places_per_label",
            "single_place_labels",
            "conformal",
        ],
        errors="ignore",
    )
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(output / OOF_FILE) as tmp:
        oof.to_csv(tmp, index=False, compression="gzip")
    return results, oof


def check_oof(oof: pd.DataFrame) -> None:
    """Every setting and repeat predicts the same rows, each exactly once."""
    expected = None
    for (setting, repeat), part in oof.groupby(["setting", "repeat"], sort=False):
        rows = part["row"].to_numpy()
        if len(np.unique(rows)) != len(rows):
            raise RuntimeError(f"{setting}, repeat {repeat}: a row is predicted more than once")
        if expected is None:
            expected = set(rows.tolist())
        elif set(rows.tolist()) != expected:
            raise RuntimeError(f"{setting}, repeat {repeat} predicted other rows than the rest")


# ---------------------------------------------------------------------- scoring pooled rows
def _codes(part: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    return part["label"].map(index).to_numpy(), part["pred"].map(index).to_numpy()


def pooled_scores(part: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of one setting's pooled OOF predictions of one repeat: OA, macro-F1, kappa, F1 per
    class, and ECE before and after each fold's temperature (the raw probabilities are recovered
    from the calibrated ones: ``softmax(T log p)``)."""
    labels, preds = _codes(part, classes)
    values = scores(confusion_matrix(labels, preds, len(classes)))
    probs = torch.tensor(part[[f"p_{c}" for c in classes]].to_numpy(np.float64))
    temperature = torch.tensor(part["temperature"].to_numpy(np.float64))[:, None]
    raw = (torch.log(probs.clamp_min(1e-300)) * temperature).softmax(dim=1)
    y = torch.tensor(labels)
    ece, ece_calibrated = expected_calibration_error(raw, y), expected_calibration_error(probs, y)
    return {
        **{m: values[m] for m in SCALARS},
        "ece": ece,
        "ece_calibrated": ece_calibrated,
        **_per_class(classes, values["f1_per_class"]),
    }


def alone_views(oof: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """For each setting of both views, its predictions with one view removed (the columns
    ``pred_<view>``, ``p_<view>_<class>``), as settings named ``<setting> · <view> alone``."""
    parts = []
    for view in VIEWS:
        if f"pred_{view}" not in oof.columns:
            continue
        part = oof[oof[f"pred_{view}"].fillna("").astype(str) != ""].copy()
        part["setting"] = part["setting"] + f" · {view} alone"
        part["pred"] = part[f"pred_{view}"]
        for c in classes:
            part[f"p_{c}"] = part[f"p_{view}_{c}"]
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else oof.iloc[:0]


def pooled_table(oof: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """:func:`pooled_scores` per setting and repeat (a row each)."""
    return pd.DataFrame(
        [
            {"setting": setting, "repeat": repeat, **pooled_scores(part, classes)}
            for (setting, repeat), part in oof.groupby(["setting", "repeat"], sort=False)
        ]
    )


def cluster_bootstrap(
    labels: np.ndarray,
    groups: np.ndarray,
    preds: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    num_classes: int,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Macro-F1 of ``preds`` minus ``reference`` (each a list over repeats of ``(N,)`` class
    indexes for the same rows ``labels (N,)``), averaged over repeats: observed value and 95%
    percentile interval.

    Rows of one place are not independent, so each resample draws **places** (``groups (N,)``)
    with replacement, within each label's places (a place counts under its most common label),
    takes all their rows, and scores both models on those same rows. With one row per group this
    is the ordinary row bootstrap.
    """
    if len(preds) != len(reference) or not preds:
        raise ValueError("need the same number (>= 1) of repeats for both models")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    place_rows = [np.array(r) for r in members.values()]
    place_label = [np.bincount(labels[r], minlength=num_classes).argmax() for r in place_rows]
    strata = [
        np.array([j for j, k in enumerate(place_label) if k == label])
        for label in sorted(set(place_label))
    ]

    def difference(rows: np.ndarray) -> float:
        return float(np.mean([
            macro_f1(labels[rows], a[rows], num_classes)
            - macro_f1(labels[rows], b[rows], num_classes)
            for a, b in zip(preds, reference, strict=True)
        ]))  # fmt: skip

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        picked = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        draws.append(difference(np.concatenate([place_rows[j] for j in picked])))
    low, high = np.percentile(draws, [2.5, 97.5])
    return difference(np.arange(len(labels))), float(low), float(high)


def versus(
    oof: pd.DataFrame, pooled: pd.DataFrame, reference: str, classes: Sequence[str], n_boot: int
) -> pd.DataFrame:
    """Each setting's pooled OOF macro-F1 minus ``reference``'s: per repeat, mean, and the
    cluster-bootstrap 95% interval (places resampled, the same rows for both); and the class
    whose F1 (mean over repeats) falls most below the reference's, with that difference."""

    def per_repeat(setting: str) -> list[pd.DataFrame]:
        part = oof[oof["setting"] == setting]
        return [p.sort_values("row") for _, p in part.groupby("repeat")]

    ref = per_repeat(reference)
    labels, _ = _codes(ref[0], classes)
    groups = ref[0]["group"].to_numpy()
    ref_preds = [_codes(p, classes)[1] for p in ref]
    ref_f1 = pooled[pooled["setting"] == reference].sort_values("repeat")["macro_f1"].to_numpy()
    per_class = pooled.groupby("setting")[[f"f1_{c}" for c in classes]].mean()
    out = []
    for setting in dict.fromkeys(oof["setting"]):
        if setting == reference:
            continue
        f1 = pooled[pooled["setting"] == setting].sort_values("repeat")["macro_f1"].to_numpy()
        preds = [_codes(p, classes)[1] for p in per_repeat(setting)]
        mean, low, high = cluster_bootstrap(
            labels, groups, preds, ref_preds, len(classes), n_boot=n_boot
        )
        gaps = (per_class.loc[setting] - per_class.loc[reference]).dropna()
        out.append(
            {"setting": setting, "per_repeat": list(f1 - ref_f1), "mean": mean,
             "low": low, "high": high, "worst_class": gaps.idxmin()[3:], "worst": gaps.min()}
        )  # fmt: skip
    return pd.DataFrame(out)


# ---------------------------------------------------------------------- reporting
def summarize(results: pd.DataFrame, pooled: pd.DataFrame) -> pd.DataFrame:
    """Per setting (in order): mean and std over repeats of the pooled OOF metrics, and the runs'
    costs."""
    order = list(dict.fromkeys(pooled["setting"]))
    grouped = pooled.groupby("setting", sort=False)
    metric_columns = [c for c in pooled.columns if c not in ("setting", "repeat")]
    mean = grouped[metric_columns].mean().loc[order]
    std = grouped[metric_columns].std(ddof=1).loc[order]
    out = pd.DataFrame(index=pd.Index(order, name="setting"))
    for c in metric_columns:
        out[c], out[f"{c}_std"] = mean[c], std[c]
    runs = results.groupby("setting", sort=False)  # a view alone has no runs of its own
    out["repeats"] = grouped.size().loc[order]
    out["runs"] = runs.size().reindex(order)
    out["train_seconds"] = runs["train_seconds"].mean().reindex(order)
    out["token_seconds"] = runs["token_seconds"].sum().reindex(order)
    out["test_samples_per_s"] = runs["test_samples_per_s"].median().reindex(order)
    out["vit_tokens"] = runs["vit_tokens"].first().reindex(order)
    out["parameters"] = runs["parameters"].first().reindex(order)
    return out


def with_sets(
    part: pd.DataFrame, conformal: dict[str, object] | None, classes: Sequence[str]
) -> pd.DataFrame:
    """A run's held-out rows with ``pred_set`` and ``set_size`` at :data:`SET_COVERAGE`, from
    its calibrated probabilities and the conformal calibration of its inner val places (as
    ``fusion predict --coverage`` makes them from ``fusion fit``'s checkpoint); unchanged for a
    run without one."""
    calibration = None if conformal is None else ConformalCalibration.from_dict(conformal)
    if calibration is None:
        return part
    member = calibration.sets(_probabilities(part, classes), SET_COVERAGE)
    return part.assign(pred_set=set_names(member, classes), set_size=member.sum(1))


def oof_calibration(oof: pd.DataFrame, classes: Sequence[str]) -> ConformalCalibration:
    """The :class:`~fusion.conformal.ConformalCalibration` of out-of-fold rows (``p_<class>``,
    ``label``, ``group``): each row predicted by a model that never saw its place."""
    labels = oof["label"].map({c: k for k, c in enumerate(classes)})
    if labels.isna().any():
        unknown = sorted(set(oof["label"][labels.isna()].astype(str)))
        raise ValueError(f"out-of-fold labels {unknown} are not among the classes {classes}")
    return ConformalCalibration.fit(
        _probabilities(oof, classes), labels.to_numpy(), oof["group"].to_numpy(), seed=1
    )


def calibrate_checkpoint(
    ckpt_path: Path, oof_path: Path, setting: str, output: Path
) -> ConformalCalibration:
    """Write ``output``: the checkpoint ``ckpt_path`` with the conformal calibration of the
    out-of-fold rows of ``setting`` in ``oof_path`` (``oof_predictions.csv.gz`` of ``fusion
    compare``; every repeat, each place counting once), in place of its val places' one. The
    cross-validation should be of the checkpoint's own config: its models never saw the rows'
    places, as the checkpoint's model will not have seen a user's."""
    ckpt = read_checkpoint(ckpt_path)
    classes = checkpoint_contract(ckpt, ckpt_path).classes
    oof = pd.read_csv(oof_path, keep_default_na=False)
    missing = {"setting", "label", "group", *(f"p_{c}" for c in classes)} - set(oof)
    if missing:
        raise InputError(
            f"missing column(s) {sorted(missing)} (the checkpoint's classes are "
            f"{list(classes)})", file=oof_path,
        )  # fmt: skip
    part = oof[oof["setting"] == setting]
    if part.empty:
        raise InputError(
            f"no rows of setting '{setting}' (settings: {sorted(set(oof['setting']))})",
            file=oof_path,
        )  # fmt: skip
    try:
        calibration = oof_calibration(part, classes)
    except ValueError as err:
        raise InputError(str(err), file=oof_path) from err
    ckpt["conformal"] = calibration.to_dict()
    with atomic_path(output) as tmp:
        torch.save(ckpt, tmp)
    return calibration


def with_cross_fitted_sets(
    folded: Sequence[pd.DataFrame], classes: Sequence[str]
) -> list[pd.DataFrame]:
    """Each fold's held-out rows with ``pred_set_cv`` and ``set_size_cv``: sets at
    :data:`SET_COVERAGE` calibrated on the other folds' held-out rows (cross-conformal: more
    places than one fold's inner val quarter, and none of the fold's own rows), as ``fusion
    calibrate`` calibrates a model on a whole cross-validation."""
    if len(folded) < 2:
        return list(folded)
    out = []
    for i, part in enumerate(folded):
        others = pd.concat([p for j, p in enumerate(folded) if j != i], ignore_index=True)
        member = oof_calibration(others, classes).sets(_probabilities(part, classes), SET_COVERAGE)
        out.append(part.assign(pred_set_cv=set_names(member, classes), set_size_cv=member.sum(1)))
    return out


def _probabilities(part: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    return part[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64)


SET_CALIBRATIONS = {"pred_set": "inner val places", "pred_set_cv": "other folds"}


def set_coverage(oof: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Empirical coverage and mean size of the conformal sets (:data:`SET_COVERAGE`) on the
    held-out folds, per setting and calibration (:data:`SET_CALIBRATIONS`), overall and per
    true class: mean and std over repeats of the pooled out-of-fold rows. Every setting has
    cross-fitted sets; those without a conformal calibration of their own (the linear probe)
    have no inner-val rows."""
    records = []
    names = np.array(classes)
    for (setting, repeat), part in oof.groupby(["setting", "repeat"], sort=False):
        labels = np.array([list(classes).index(c) for c in part["label"]])
        for column, calibration in SET_CALIBRATIONS.items():
            if column not in part or part[column].isna().all():
                continue
            member = np.array([np.isin(names, str(s).split("|")) for s in part[column]])
            for row in coverage_table(member, labels, classes):
                records.append(
                    {"setting": setting, "calibration": calibration, "repeat": repeat, **row}
                )
    frame = pd.DataFrame(records).rename(columns={"class": "true_class"})
    return (
        frame.groupby(["setting", "calibration", "true_class"], sort=False)
        .agg(rows=("rows", "mean"), coverage=("coverage", "mean"),
             coverage_std=("coverage", "std"), mean_set_size=("mean_set_size", "mean"))
        .reset_index()
    )  # fmt: skip


def coverage_markdown(table: pd.DataFrame) -> str:
    """The :func:`set_coverage` table as markdown, a row per setting, calibration and class."""
    lines = [
        f"### Conformal prediction sets at {SET_COVERAGE:.0%} on the held-out places",
        "",
        "Class-conditional APS sets (fusion.conformal) of each held-out fold, scored on that "
        "fold, calibrated on places its rows never chose: *inner val places*, the fold "
        "model's inner val quarter (which also fitted the heads' weights and temperature; what "
        "`fusion fit`'s checkpoint holds); *other folds*, the other folds' held-out rows "
        "(cross-fitted; what `fusion calibrate` gives a model). Mean ± std over repeats.",
        "",
        "| setting | calibration | true class | rows | coverage | mean set size |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.setting} | {row.calibration} | {row.true_class} | {row.rows:.0f} | "
            f"{_pm(row.coverage, row.coverage_std)} | {row.mean_set_size:.2f} |"
        )
    return "\n".join(lines) + "\n"


def flag_table(oof: pd.DataFrame) -> pd.DataFrame:
    """Per setting: the share of held-out rows flagged as unfamiliar (:mod:`fusion.ood`, at
    :data:`~fusion.ood.FLAG_RATE` of the inner val places) and the accuracy of the flagged rows
    and of the rest, means over repeats."""
    records = []
    for (setting, repeat), part in oof.groupby(["setting", "repeat"], sort=False):
        flagged = part["flagged"].astype(str).str.lower() == "true"
        if part["flagged"].isna().all() or (part["flagged"].astype(str) == "").all():
            continue
        right = (part["pred"] == part["label"]).to_numpy()
        records.append({
            "setting": setting, "repeat": repeat, "flagged": flagged.mean(),
            "accuracy_flagged": right[flagged.to_numpy()].mean() if flagged.any() else np.nan,
            "accuracy_rest": right[~flagged.to_numpy()].mean(),
            "accuracy_all": right.mean(),
        })  # fmt: skip
    frame = pd.DataFrame(records)
    return frame.groupby("setting", sort=False).mean(numeric_only=True).drop(columns="repeat")


def flags_markdown(table: pd.DataFrame) -> str:
    """The :func:`flag_table` as markdown."""
    lines = [
        f"### Unfamiliar tiles flagged on the held-out places (energy, {FLAG_RATE:.0%} of the "
        "inner val places)",
        "",
        "| setting | rows flagged | accuracy flagged | accuracy rest | accuracy all |",
        "|---|---:|---:|---:|---:|",
    ]
    for setting, row in table.iterrows():
        lines.append(
            f"| {setting} | {row.flagged:.1%} | {row.accuracy_flagged:.3f} | "
            f"{row.accuracy_rest:.3f} | {row.accuracy_all:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def protocol_text(folds: int, repeats: int, first: dict[str, Any], oof: pd.DataFrame) -> str:
    """The protocol in plain words, with the places per class and the classes that cannot be
    judged on new places."""
    places = first["places_per_label"]
    lonely = first["single_place_labels"]
    rows = oof[(oof["setting"] == oof["setting"].iloc[0]) & (oof["repeat"] == 0)]
    counts = ", ".join(f"{label} {n}" for label, n in places.items())
    text = (
        f"**Protocol: place-grouped {folds}-fold cross-validation, {repeats} repeats.** A place "
        "is a sensor, or a group of sensors within 75 m of each other (`holdout_group`). The "
        f"places are dealt into {folds} folds, stratified by label. Each fold's model is trained "
        "on the other folds' places for a fixed number of epochs: a first model, trained without "
        "an inner place-disjoint quarter of those places, weighs the heads (or fits the softmax "
        "temperature) on that quarter; the final model is trained on all of them with those "
        "weights (the linear probe chooses its L2 strength the same way), and predicts the "
        "held-out fold once. Pooled over the folds, each of the "
        f"{len(rows)} evaluable rows ({rows['group'].nunique()} places) is predicted exactly "
        "once per repeat by a model that never saw its place (out-of-fold). A repeat reshuffles "
        "the folds, the inner split, the training order and the initialisation. Metrics are "
        "computed on the pooled out-of-fold rows of each repeat and given as mean ± std over "
        "repeats; macro-F1 averages the classes present in the evaluated truth. "
        f"Places per class: {counts}."
    )
    if lonely:
        text += (
            f" **Not evaluable on new places: {', '.join(lonely)}** (a single place: always "
            "trained on, never tested, so it can only appear as a wrong prediction)."
        )
    return text


def summary_markdown(summary: pd.DataFrame, classes: Sequence[str], title: str) -> str:
    """Markdown tables: pooled OOF metrics (mean ± std over repeats) with costs, and F1 per
    class."""
    key = "setting"
    lines = [
        f"## {title}",
        "",
        f"| {key} | macro-F1 | OA | kappa | ECE | ECE calibrated | train s/run | test samples/s "
        "| parameters | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.iterrows():
        cells = [_pm(r[c], r[f"{c}_std"]) for c in ("macro_f1", "OA", "kappa", "ece")]
        cells.append(_pm(r["ece_calibrated"], r["ece_calibrated_std"]))
        if np.isnan(r["runs"]):  # a view alone: the same runs as its setting
            cells += ["", "", "", "(same)"]
        else:
            rate = f"{r['test_samples_per_s']:.0f}" + ("*" if r["vit_tokens"] == "cached" else "")
            cells += [f"{r['train_seconds']:.0f}", rate, f"{int(r['parameters']):,}"]
            cells.append(str(int(r["runs"])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Train seconds exclude the one-time frozen-ViT token computation "
        f"({summary['token_seconds'].sum():.0f} s in all, then cached). *Test samples/s read "
        "the ViT's tokens from that cache: the ViT itself runs at about 5 samples/s on this CPU "
        "(see Cost).",
        "",
    ]
    evaluable = [c for c in classes if not summary[f"f1_{c}"].isna().all()]
    lines += [
        "F1 per class (pooled out-of-fold, mean over repeats):",
        "",
        f"| {key} | " + " | ".join(evaluable) + " |",
        "|---|" + "---|" * len(evaluable),
    ]
    for name, r in summary.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{r[f'f1_{c}']:.3f}" for c in evaluable) + " |")
    return "\n".join(lines) + "\n"


def versus_markdown(table: pd.DataFrame, reference: str) -> str:
    lines = [
        f"## Against {reference} (pooled out-of-fold macro-F1 difference)",
        "",
        "| setting | per repeat | mean | 95% interval (places resampled) "
        "| worst class (F1 difference) |",
        "|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        per = ", ".join(f"{d:+.3f}" for d in r["per_repeat"])
        interval = f"[{r['low']:+.3f}, {r['high']:+.3f}]"
        worst = f"{r['worst_class']} {r['worst']:+.3f}"
        lines.append(f"| {r['setting']} | {per} | {r['mean']:+.3f} | {interval} | {worst} |")
    return "\n".join(lines) + "\n"


def plot_metric(pooled: pd.DataFrame, path: Path, title: str) -> Path:
    """Pooled OOF macro-F1 and OA per setting: mean over repeats (bar), each repeat a dot."""
    order = list(dict.fromkeys(pooled["setting"]))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(order), 3.8), sharey=True)
    for ax, metric in zip(axes, ("macro_f1", "OA"), strict=True):
        values = [pooled.loc[pooled["setting"] == k, metric].to_numpy() for k in order]
        x = np.arange(len(order))
        ax.bar(x, [v.mean() for v in values], color="tab:blue", alpha=0.6)
        for i, v in enumerate(values):
            ax.scatter(np.full(len(v), i), v, color="black", s=12, zorder=3)
        ax.set_xticks(x, order, rotation=30 if len(order) > 3 else 0, ha="right")
        ax.set_title(f"{metric.replace('_', '-')} (out-of-fold)")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusions(oof: pd.DataFrame, classes: Sequence[str], path: Path) -> Path:
    """Pooled OOF confusion matrices side by side, one per setting, summed over repeats."""
    settings = list(dict.fromkeys(oof["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(2.2 + 2.6 * len(settings), 3.8))
    for k, (ax, setting) in enumerate(zip(np.atleast_1d(axes), settings, strict=True)):
        labels, preds = _codes(oof[oof["setting"] == setting], classes)
        draw_confusion(
            ax, confusion_matrix(labels, preds, len(classes)), classes, setting,
            class_labels_y=k == 0,
        )  # fmt: skip
    fig.supxlabel("predicted", fontsize=9)
    fig.supylabel("true", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _report(
    settings: Sequence[Setting],
    folds: int,
    repeats: int,
    output: Path,
    title: str,
    references: Sequence[str] = (),
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Cross-validate ``settings`` and write ``summary.md``, ``<name>.png`` and
    ``confusion.png``; returns the results frame."""
    results, oof = cross_validate(settings, folds, repeats, output)
    first = json.loads(next((output / "runs").glob("*/*/result.json")).read_text())
    classes = first["classes"]
    pooled = pooled_table(oof, classes)
    every = pd.concat([oof, alone_views(oof, classes)], ignore_index=True)
    pooled_every = pd.concat(
        [pooled, pooled_table(every[~every["setting"].isin(pooled["setting"])], classes)]
    )
    summary = summarize(results, pooled_every)
    text = f"{protocol_text(folds, repeats, first, oof)}\n\n"
    text += summary_markdown(summary, classes, title)
    for reference in references:
        if reference in summary.index:
            table = versus(every, pooled_every, reference, classes, n_boot)
            text += "\n" + versus_markdown(table, reference)
    if "pred_set" in oof.columns:
        text += "\n" + coverage_markdown(set_coverage(oof, classes))
    if "flagged" in oof.columns:
        text += "\n" + flags_markdown(flag_table(oof))
    _write_atomic(output / "summary.md", text)
    plot_metric(pooled, output / f"{output.name}.png", title)
    plot_confusions(oof, classes, output / "confusion.png")
    return results


# ---------------------------------------------------------------------- the two experiments
def ablate(
    config: str | Path,
    depths: Sequence[str],
    folds: int,
    repeats: int,
    output: Path,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Cross-validate each MBT fusion depth (``--model.net.fusion_layer``) of ``config`` (a
    variant's name, or a YAML file read over the base config: :func:`config_files`)."""
    files = config_files(config)
    settings = [
        Setting(depth, files, [*overrides, "--model.net.fusion_layer", depth]) for depth in depths
    ]
    title = f"Fusion-depth ablation ({Path(config).stem})"
    return _report(settings, folds, repeats, output, title)


def compare(
    configs: Sequence[str],
    folds: int,
    repeats: int,
    output: Path,
    baseline: str = "bilstm",
    reference: str = "vit",
    config_dir: Path = CONFIG_DIR,
    overrides: Sequence[str] = (),
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Cross-validate each config (a variant's name, or a YAML file read over the base config:
    :func:`config_files`); each against ``baseline`` and the image-only ``reference``.

    The name ``linear_probe`` is the logistic regression on the frozen ViT features of the
    ``vit`` variant's data (:mod:`fusion.linear_probe`), the bar every image branch must clear.
    """
    names = [baseline, *[c for c in configs if c != baseline]]
    settings = []
    for name in names:
        if name == LINEAR_PROBE:
            files = config_files("vit", config_dir)
            settings.append(Setting(name, files, list(overrides), LINEAR_PROBE))
            continue
        settings.append(Setting(Path(name).stem, config_files(name, config_dir), list(overrides)))
    refs = list(dict.fromkeys([Path(baseline).stem, Path(reference).stem]))
    return _report(settings, folds, repeats, output, "Model comparison", refs, n_boot)


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
        "CPU, frozen ViT. Seconds were measured with one torch thread per job while two or three "
        "jobs shared the 2-core CPU: compare them within a table, roughly.",
        "",
    ]
    for folder, images in (
        (comparison, ("compare.png", "confusion.png")),
        (ablation, ("ablation.png",)),
    ):
        if folder is None:
            continue
        summary = (folder / "summary.md").read_text().replace("\n## ", "\n### ")
        parts += [summary.rstrip(), ""]
        for image in images:
            rel = (folder / image).resolve().relative_to(root)
            parts += [f"![{image}]({rel.as_posix()})", ""]
        rel = (folder / "results.csv").resolve().relative_to(root).as_posix()
        oof = (folder / OOF_FILE).resolve().relative_to(root).as_posix()
        parts += [f"Per-run rows: `{rel}`; out-of-fold predictions: `{oof}`.", ""]
    section = "\n".join([RESULTS_START, *parts, RESULTS_END])
    text = readme.read_text()
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + section + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    _write_atomic(readme, text)
    return section
