"""Train/validation splits: stratified by label, or place-disjoint (grouped by series key).

The benchmark's own ``val`` rows reuse the training sensors, so a model can score well there by
recognising a sensor rather than a kind of place. A place-disjoint split keeps every group (a
sensor, or a set of nearby sensors) wholly on one side.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np


def stratified_split(labels: Sequence[str], *, val_fraction: float, seed: int) -> np.ndarray:
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
    labels: Sequence[str], groups: Sequence[str], *, val_fraction: float, seed: int
) -> np.ndarray:
    """Place-disjoint split: whole groups go to ``"train"`` or ``"val"``. Returns ``(N,)``.

    Each group takes its most common label; per label, ``val_fraction`` of its groups (at least one
    when the label has two or more groups, none when it has one) go to val. A label with a single
    group therefore stays in train only: it cannot be judged on an unseen place.
    """
    _check_fraction(val_fraction)
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    rng = np.random.default_rng(seed)
    group_labels: dict[str, Counter[str]] = defaultdict(Counter)
    for label, group in zip(labels, groups, strict=True):
        group_labels[group][label] += 1
    by_label: dict[str, list[str]] = defaultdict(list)
    for group in sorted(group_labels):
        by_label[group_labels[group].most_common(1)[0][0]].append(group)
    val_groups: set[str] = set()
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        n_val = max(1, round(val_fraction * len(members))) if len(members) > 1 else 0
        val_groups.update(members[:n_val])
    return np.array(["val" if g in val_groups else "train" for g in groups], dtype=object)


def single_group_labels(labels: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Labels whose rows all come from one group (they cannot appear in a place-disjoint val)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for label, group in zip(labels, groups, strict=True):
        seen[label].add(group)
    return sorted(label for label, members in seen.items() if len(members) == 1)


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
