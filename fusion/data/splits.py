"""Train/validation splits (stratified by label, or place-disjoint: grouped by series key) and
place-grouped K-fold cross-validation.

The benchmark's own ``val`` rows reuse the training sensors, so a model can score well there by
recognising a sensor rather than a kind of place. A place-disjoint split keeps every group (a
sensor, or a set of nearby sensors) wholly on one side.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[str], *, val_fraction: float, seed: int | Sequence[int]
) -> np.ndarray:
    """``"train"``/``"val"`` per row, ``val_fraction`` of each label to val; ``(N,)`` objects."""
    _check_fraction(val_fraction)
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "train", dtype=object)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for label in sorted(by_label):
        rows = np.array(by_label[label])
        rng.shuffle(rows)
        n_val = round(val_fraction * len(rows)) if len(rows) > 1 else 0
        out[rows[:n_val]] = "val"
    return out


def group_split(
    labels: Sequence[str], groups: Sequence[str], *, val_fraction: float, seed: int | Sequence[int]
) -> np.ndarray:
    """Place-disjoint split: whole groups go to ``"train"`` or ``"val"``. Returns ``(N,)``.

    Each group takes its most common label; per label, ``val_fraction`` of its groups (at least one
    when the label has two or more groups, none when it has one) go to val. A label with a single
    group therefore stays in train only: it cannot be judged on an unseen place.
    """
    _check_fraction(val_fraction)
    by_label, _ = _groups_by_label(labels, groups)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        n_val = max(1, round(val_fraction * len(members))) if len(members) > 1 else 0
        val_groups.update(members[:n_val])
    return np.array(["val" if g in val_groups else "train" for g in groups], dtype=object)


def group_folds(
    labels: Sequence[str], groups: Sequence[str], *, folds: int, seed: int | Sequence[int]
) -> np.ndarray:
    """Place-grouped, label-stratified K-fold assignment: the fold ``(N,)`` int of every row.

    Each group (a place) takes its most common label and goes wholly to one fold. Per label, from
    the label with the fewest groups up, its groups are shuffled and dealt out one at a time to the
    fold holding the fewest of that label's groups, then the fewest rows (ties at random), so a
    label's groups land in different folds while they last and fold sizes stay close. A label
    with fewer than two groups cannot be judged on a place the model has not seen: its rows get
    fold ``-1``, never held out (always trained on). ``seed`` reshuffles the whole assignment.
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    by_label, size = _groups_by_label(labels, groups)
    rng = np.random.default_rng(seed)
    load = np.zeros(folds)
    fold_of: dict[str, int] = {}
    for label in sorted(by_label, key=lambda k: (len(by_label[k]), k)):
        members = list(by_label[label])
        if len(members) < 2:
            fold_of.update(dict.fromkeys(members, -1))
            continue
        rng.shuffle(members)
        held = np.zeros(folds)  # this label's groups per fold
        for group in members:
            # Fewest of this label's groups first, then fewest rows, then at random.
            order = np.lexsort((rng.random(folds), load, held))
            fold = int(order[0])
            fold_of[group] = fold
            held[fold] += 1
            load[fold] += size[group]
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _groups_by_label(
    labels: Sequence[str], groups: Sequence[str]
) -> tuple[dict[str, list[str]], Counter[str]]:
    """Groups per label (each group under its most common label, in sorted order) and rows per
    group."""
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    group_labels: dict[str, Counter[str]] = defaultdict(Counter)
    for label, group in zip(labels, groups, strict=True):
        group_labels[group][label] += 1
    by_label: dict[str, list[str]] = defaultdict(list)
    for group in sorted(group_labels):
        by_label[group_labels[group].most_common(1)[0][0]].append(group)
    size = Counter({g: sum(c.values()) for g, c in group_labels.items()})
    return dict(by_label), size


def single_group_labels(labels: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Labels whose rows all come from one group (they cannot appear in a place-disjoint val)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for label, group in zip(labels, groups, strict=True):
        seen[label].add(group)
    return sorted(label for label, members in seen.items() if len(members) == 1)


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
