"""Why each view decided: which view moved each fused prediction, and how often, per class.

``fusion predict`` and ``fusion test`` write, per sample, the fused class ``pred`` with its
probabilities ``p_<class>``, and what each view says alone (the model with the other view
removed): ``pred_image`` / ``p_image_<class>`` and ``pred_series`` / ``p_series_<class>``, NaN
where that view is missing; ``label`` when known. From such a table:

1. :func:`explain_rows` adds, for the fused predicted class ``c`` of each sample:

   - ``fused_p``, ``image_p``, ``series_p``: the probability of ``c`` fused, from the image alone
     and from the series alone (NaN where that view is missing).
   - ``moved_by_image = log p_fused(c) - log p_series(c)`` and
     ``moved_by_series = log p_fused(c) - log p_image(c)`` (nats): how much adding that view to
     the model that had only the other one moved the probability of ``c``. Positive: the view
     pushed towards ``c``; negative: it pulled away from ``c`` and was outweighed. A missing
     view moved nothing (0); a view present alone has no other-view baseline (NaN: the model
     does not run without any view). Probabilities are clipped at ``1e-12`` before the log.
   - ``view_agree``: which views alone predict ``c`` too: ``both``, ``image``, ``series`` or
     ``neither`` with both views present; ``image only`` / ``series only`` with one view.
   - ``driver``: the view the fused prediction follows: ``image`` or ``series`` when only that
     view alone predicts ``c`` (or it is the only view), ``both`` when both do, ``-`` when
     neither does (``c`` comes from combining them).

   Rows without a prediction (``status = skipped``) get empty strings and NaN.

2. :func:`class_report` counts, per class (rows grouped by the fused predicted class or by the
   true class), how often the two views agree with each other; when they disagree, which one the
   fused model follows (``pred`` equal to ``pred_image``, to ``pred_series``, or to neither) and,
   with labels, how often it is right then.

3. :func:`write_explanation` writes ``explain.csv`` (the input rows + the columns above),
   ``report.csv``, ``report.md`` and ``views.png``, each atomically, after every check passed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fusion.errors import InputError, header_hint
from fusion.io import atomic_path, check_replaceable
from fusion.metrics import confusion_matrix, scores
from fusion.plots import save_figure

VIEWS = ("image", "series")
GroupBy = Literal["pred", "label"]
EPS = 1e-12  # probabilities are clipped here before their log
OUTPUTS = ("explain.csv", "report.csv", "report.md", "views.png")
BOTH_VIEWS = ("both", "image", "series", "neither")  # the view_agree of rows with both views
ADDED = (
    "fused_p", "image_p", "series_p", "moved_by_image", "moved_by_series", "view_agree", "driver",
)  # fmt: skip


# ---------------------------------------------------------------------------------- reading


def prediction_classes(frame: pd.DataFrame, path: str | os.PathLike[str] = "") -> list[str]:
    """The class names of a predictions table (from its ``p_image_<class>`` columns), after
    checking it holds every column :func:`explain_rows` reads.

    Raises :class:`InputError` naming ``path`` and the first missing column: ``pred``,
    ``pred_image``, ``pred_series``, a ``p_<class>`` / ``p_image_<class>`` /
    ``p_series_<class>`` column, or per-view probabilities that are empty in every row (a model
    of one view reports none).
    """

    def missing(column: str, why: str) -> InputError:
        # A table read as one column was most likely saved with another delimiter.
        hint = header_hint(path) if path and len(frame.columns) <= 1 else ""
        message = f"missing column ({why})" + (f"; {hint}" if hint else "")
        return InputError(message, file=path or None, field=column)

    for column in ("pred", "pred_image", "pred_series"):
        if column not in frame.columns:
            why = (
                "a predictions table of fusion predict or fusion test is needed"
                if column == "pred"
                else "what each view says alone is written for a model of both views only"
            )
            raise missing(column, why)
    classes = [c.removeprefix("p_image_") for c in frame.columns if c.startswith("p_image_")]
    if not classes:
        raise missing("p_image_<class>", "no per-view probabilities (a model of one view?)")
    for name in classes:
        for column in (f"p_{name}", f"p_series_{name}"):
            if column not in frame.columns:
                raise missing(column, f"the probabilities of class '{name}' are incomplete")
    for column in [f"p_{prefix}{name}" for prefix in ("", "image_", "series_") for name in classes]:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise InputError("probabilities must be numbers", file=path or None, field=column)
    views = [f"p_{view}_{name}" for view in VIEWS for name in classes]
    if len(frame) and frame[views].isna().all().all():
        raise InputError(
            "no per-view probabilities in any row (a model of one view reports none)",
            file=path or None,
            field=f"p_image_{classes[0]}",
        )
    for column in ("pred", "pred_image", "pred_series", "label"):
        if column not in frame.columns:
            continue
        names = _names(frame[column])
        unknown = sorted(set(names[names != ""]) - set(classes))
        if unknown:
            line = int(np.flatnonzero(np.isin(names, unknown))[0]) + 2
            raise InputError(
                f"class '{unknown[0]}' is not one of the table's classes {classes}",
                file=path or None,
                line=line,
                field=column,
            )
    return classes


def read_predictions(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """A predictions CSV of ``fusion predict`` or ``fusion test`` and its classes, checked
    (:func:`prediction_classes`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("predictions file not found", file=path)
    if path.suffix.lower() == ".gpkg":
        raise InputError(
            "a GeoPackage: explain reads a CSV (run fusion predict with --output NAME.csv)",
            file=path,
        )
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise InputError("the file is empty (no header, no rows)", file=path) from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the table: {err}", file=path) from err
    return frame, prediction_classes(frame, path)


def _names(column: pd.Series) -> np.ndarray:
    """A column of class names as ``(N,)`` str, ``""`` where empty."""
    return np.array(["" if pd.isna(v) else str(v) for v in column], dtype=object)


# ---------------------------------------------------------------------------------- per sample


def explain_rows(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """``frame`` (a predictions table, :func:`prediction_classes`) with the columns of
    :data:`ADDED` (module docstring) replaced or added at the end; ``(N, ...)`` → ``(N, ... + 7)``.
    """
    n = len(frame)
    pred = _names(frame["pred"])
    predicted = pred != ""
    c = np.array([classes.index(p) if p else 0 for p in pred], dtype=np.int64)  # (N,)

    def of_pred(prefix: str) -> np.ndarray:
        """``(N,)`` probability of each row's fused class in the ``p_<prefix><class>`` columns
        (NaN without a prediction)."""
        p = frame[[f"p_{prefix}{name}" for name in classes]].to_numpy(np.float64)  # (N, K)
        return np.where(predicted, p[np.arange(n), c], np.nan)

    fused, image, series = of_pred(""), of_pred("image_"), of_pred("series_")
    has_image, has_series = ~np.isnan(image) & predicted, ~np.isnan(series) & predicted
    both = has_image & has_series

    def log(p: np.ndarray) -> np.ndarray:
        return np.log(np.clip(p, EPS, 1.0))

    moved_by_image = np.select(
        [both, has_series & ~has_image, has_image], [log(fused) - log(series), 0.0, np.nan], np.nan
    )
    moved_by_series = np.select(
        [both, has_image & ~has_series, has_series], [log(fused) - log(image), 0.0, np.nan], np.nan
    )
    image_agrees = has_image & (_names(frame["pred_image"]) == pred)
    series_agrees = has_series & (_names(frame["pred_series"]) == pred)
    view_agree = np.select(
        [
            both & image_agrees & series_agrees,
            both & image_agrees,
            both & series_agrees,
            both,
            has_image,
            has_series,
        ],
        ["both", "image", "series", "neither", "image only", "series only"],
        "",
    )
    driver = np.select(
        [view_agree == "neither", np.isin(view_agree, ["image", "image only"]),
         np.isin(view_agree, ["series", "series only"]), view_agree == "both"],
        ["-", "image", "series", "both"],
        "",
    )  # fmt: skip
    added = pd.DataFrame(
        {
            "fused_p": fused,
            "image_p": image,
            "series_p": series,
            "moved_by_image": moved_by_image,
            "moved_by_series": moved_by_series,
            "view_agree": view_agree.astype(object),
            "driver": driver.astype(object),
        },
        index=frame.index,
    )
    return pd.concat([frame.drop(columns=[a for a in ADDED if a in frame.columns]), added], axis=1)


# ---------------------------------------------------------------------------------- per class


def class_report(explained: pd.DataFrame, classes: list[str], by: GroupBy = "pred") -> pd.DataFrame:
    """One row per class of ``classes`` (rows of ``explained`` grouped by their fused predicted
    class, ``by="pred"``, or by their true class, ``by="label"``), then ``all``.

    Columns (counts over rows with a prediction): ``rows``; ``one_view`` (rows with one view);
    ``both_views``; ``views_agree`` / ``views_disagree`` (both views present and
    ``pred_image`` equal to ``pred_series`` or not); ``agree_share`` (of ``both_views``);
    ``follows_image``, ``follows_series``, ``follows_neither`` (disagreements whose fused class
    is the image's, the series', or neither's).

    With labels (a ``label`` column with some names): ``labelled`` rows, and shares over the
    labelled rows of each kind (NaN where there are none): ``right_when_agree`` (the fused class
    is right when the views agree); ``right_following_image`` / ``_series`` / ``_neither``
    (right when the views disagree and it follows that view, or neither); and
    ``image_right_on_disagree`` / ``series_right_on_disagree`` (each view alone right on the
    disagreements: whether following the other one would have been better).
    """
    pred = _names(explained["pred"])
    labels = _names(explained["label"]) if "label" in explained.columns else np.full(len(pred), "")
    if by == "label" and not (labels != "").any():
        raise InputError("rows by true class need labels", field="label")
    image, series = _names(explained["pred_image"]), _names(explained["pred_series"])
    agree_with = _names(explained["view_agree"])
    both = np.isin(agree_with, BOTH_VIEWS)
    agree, disagree = both & (image == series), both & (image != series)
    kinds = {
        "rows": pred != "",
        "one_view": np.isin(agree_with, ["image only", "series only"]),
        "both_views": both,
        "views_agree": agree,
        "views_disagree": disagree,
        "follows_image": disagree & (pred == image),
        "follows_series": disagree & (pred == series),
        "follows_neither": disagree & (pred != image) & (pred != series),
    }
    labelled = (labels != "") & (pred != "")
    rights = {
        "right_when_agree": (agree, pred),
        "right_following_image": (kinds["follows_image"], pred),
        "right_following_series": (kinds["follows_series"], pred),
        "right_following_neither": (kinds["follows_neither"], pred),
        "image_right_on_disagree": (disagree, image),
        "series_right_on_disagree": (disagree, series),
    }
    group = pred if by == "pred" else labels
    records = []
    for name in [*classes, "all"]:
        rows = (group == name) if name != "all" else (group != "")
        rows = rows & (pred != "")
        record: dict[str, object] = {by: name}
        record.update({k: int((rows & m).sum()) for k, m in kinds.items()})
        both_views = record["both_views"]
        record["agree_share"] = record["views_agree"] / both_views if both_views else np.nan
        if labelled.any():
            record["labelled"] = int((rows & labelled).sum())
            for key, (kind, said) in rights.items():
                chosen = rows & labelled & kind
                record[key] = (said[chosen] == labels[chosen]).mean() if chosen.any() else np.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def view_scores(explained: pd.DataFrame, classes: list[str]) -> dict[str, dict[str, float]]:
    """OA and macro-F1 (:func:`fusion.metrics.scores`) of the fused, image-alone and
    series-alone predictions on the labelled rows that have both views (``{}`` without
    labels)."""
    if "label" not in explained.columns:
        return {}
    labels = _names(explained["label"])
    rows = (labels != "") & np.isin(_names(explained["view_agree"]), BOTH_VIEWS)
    if not rows.any():
        return {}
    index = {name: k for k, name in enumerate(classes)}
    truth = np.array([index[v] for v in labels[rows]])
    out = {}
    predictions = {"fused": "pred", "image alone": "pred_image", "series alone": "pred_series"}
    for name, column in predictions.items():
        said = np.array([index[v] for v in _names(explained[column])[rows]])
        values = scores(confusion_matrix(truth, said, len(classes)))
        out[name] = {"n": int(rows.sum()), "OA": values["OA"], "macro_f1": values["macro_f1"]}
    return out


# ---------------------------------------------------------------------------------- writing


def _count(n: int, total: int) -> str:
    return f"{n} / {total} ({n / total:.0%})" if total else "0"


def _share(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.0%}"


def report_markdown(
    report: pd.DataFrame, by: GroupBy, source: str, view_metrics: dict[str, dict[str, float]]
) -> str:
    """The per-class report as a markdown page: what the rows are, the table, the overall
    numbers and, with labels, each view's scores."""
    rows_are = "fused predicted class" if by == "pred" else "true class"
    total = report.iloc[-1]
    lines = [
        "# Why each view decided",
        "",
        f"Predictions: `{source}`. Rows: **{rows_are}**. The views agree when the image alone "
        "and the series alone (the model with the other view removed) predict the same class; "
        "when they disagree, the fused model follows the view whose class it predicts.",
        "",
    ]
    disagree = int(total["views_disagree"])
    lines.append(
        f"Over all {int(total['rows'])} predicted rows: {int(total['both_views'])} with both "
        f"views, which agree on {_count(int(total['views_agree']), int(total['both_views']))}; "
        f"{int(total['one_view'])} with one view only."
    )
    if disagree:
        follows = ", ".join(
            f"{view} {_count(int(total[f'follows_{view}']), disagree)}"
            for view in ("image", "series", "neither")
        )
        lines.append(f"When they disagree the fused model follows: {follows}.")
    labelled = "labelled" in report.columns
    if labelled and disagree:
        lines.append(
            "Right when following the image: "
            f"{_share(total['right_following_image'])}, the series: "
            f"{_share(total['right_following_series'])} (on the disagreements the image alone "
            f"is right on {_share(total['image_right_on_disagree'])}, the series alone on "
            f"{_share(total['series_right_on_disagree'])})."
        )
    if not labelled:
        lines.append("No labels: agreement only.")
    lines += ["", _table(report, by, labelled)]
    if view_metrics:
        lines += [
            "",
            f"Labelled rows with both views ({next(iter(view_metrics.values()))['n']}):",
            "",
            "| prediction | OA | macro-F1 |",
            "|---|---:|---:|",
            *(
                f"| {name} | {m['OA']:.3f} | {m['macro_f1']:.3f} |"
                for name, m in view_metrics.items()
            ),
        ]
    lines += ["", "![views.png](views.png)", ""]
    return "\n".join(lines)


def _table(report: pd.DataFrame, by: GroupBy, labelled: bool) -> str:
    head = [by, "rows", "one view", "views agree", "fused follows image", "follows series",
            "follows neither"]  # fmt: skip
    if labelled:
        head += ["right: agree", "right: follows image", "right: follows series"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for _, r in report.iterrows():
        disagree = int(r["views_disagree"])
        cells = [
            str(r[by]),
            str(int(r["rows"])),
            str(int(r["one_view"])),
            _count(int(r["views_agree"]), int(r["both_views"])),
            *(_count(int(r[f"follows_{v}"]), disagree) for v in ("image", "series", "neither")),
        ]
        if labelled:
            cells += [_share(r[k]) for k in ("right_when_agree", "right_following_image",
                                             "right_following_series")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_views(report: pd.DataFrame, by: GroupBy, title: str = "") -> plt.Figure:
    """Per class (``report``'s rows but ``all``): stacked bars of the rows whose views agree,
    whose fused class follows the image, the series, or neither when they disagree, and with
    one view only; with labels, a second panel of how often the fused class is right in each
    case."""
    part = report[report[by] != "all"]
    labelled = "labelled" in report.columns
    fig, axes = plt.subplots(
        1, 2 if labelled else 1, figsize=(12 if labelled else 7, 2.2 + 0.45 * len(part)),
        squeeze=False, sharey=True, layout="constrained",
    )  # fmt: skip
    y = np.arange(len(part))
    left = np.zeros(len(part))
    stacks = {
        "views agree": ("views_agree", "tab:green"),
        "disagree: follows image": ("follows_image", "tab:blue"),
        "disagree: follows series": ("follows_series", "tab:orange"),
        "disagree: follows neither": ("follows_neither", "tab:red"),
        "one view only": ("one_view", "tab:gray"),
    }
    ax = axes[0, 0]
    for name, (column, color) in stacks.items():
        values = part[column].to_numpy(float)
        ax.barh(y, values, left=left, color=color, label=name)
        left += values
    ax.set_yticks(y, part[by].tolist())
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_ylabel("fused predicted class" if by == "pred" else "true class")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    if labelled:
        ax = axes[0, 1]
        bars = {
            "views agree": ("right_when_agree", "tab:green"),
            "follows image": ("right_following_image", "tab:blue"),
            "follows series": ("right_following_series", "tab:orange"),
        }
        height = 0.8 / len(bars)
        for k, (name, (column, color)) in enumerate(bars.items()):
            ax.barh(y - 0.4 + (k + 0.5) * height, part[column].to_numpy(float), height,
                    color=color, label=name)  # fmt: skip
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of labelled rows where the fused class is right")
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(title or "which view the fused prediction follows", fontsize=10)
    return fig


@dataclass
class Explanation:
    """What :func:`write_explanation` wrote: the rows with their added columns, the per-class
    report and the files."""

    rows: pd.DataFrame
    report: pd.DataFrame
    files: dict[str, Path]


def write_explanation(
    predictions: str | os.PathLike[str], output: str | os.PathLike[str], by: GroupBy = "pred"
) -> Explanation:
    """Read ``predictions`` (:func:`read_predictions`) and write ``output/explain.csv``,
    ``report.csv``, ``report.md`` and ``views.png``. Every input check and the outputs'
    writability come first, and each file is written atomically: a bad input writes nothing."""
    output = Path(output)
    files = {name: output / name for name in OUTPUTS}
    for path in files.values():
        check_replaceable(path)
    frame, classes = read_predictions(predictions)
    if by == "label" and ("label" not in frame.columns or frame["label"].isna().all()):
        raise InputError("rows by true class (--by label) need labels", file=predictions,
                         field="label")  # fmt: skip
    rows = explain_rows(frame, classes)
    report = class_report(rows, classes, by)
    markdown = report_markdown(report, by, str(predictions), view_scores(rows, classes))
    figure = plot_views(report, by, title=f"{Path(predictions).name}: which view the fused "
                        "prediction follows")  # fmt: skip
    save_figure(figure, files["views.png"])
    for name, table in (("explain.csv", rows), ("report.csv", report)):
        with atomic_path(files[name]) as tmp:
            table.to_csv(tmp, index=False)
    with atomic_path(files["report.md"]) as tmp:
        tmp.write_text(markdown)
    return Explanation(rows=rows, report=report, files=files)
