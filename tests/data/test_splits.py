"""Stratified and place-disjoint splits, and place-grouped folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusion.data.splits import group_folds, group_split, single_group_labels, stratified_split


def test_stratified_split_keeps_label_shares_and_is_seeded() -> None:
    labels = ["a"] * 50 + ["b"] * 20 + ["c"] * 1
    first = stratified_split(labels, val_fraction=0.2, seed=3)
    again = stratified_split(labels, val_fraction=0.2, seed=3)
    other = stratified_split(labels, val_fraction=0.2, seed=4)
    assert (first == again).all() and not (first == other).all()
    frame = pd.DataFrame({"label": labels, "split": first})
    val = frame[frame["split"] == "val"].groupby("label").size()
    assert val["a"] == 10 and val["b"] == 4 and "c" not in val  # a single row stays in train


def test_group_split_is_place_disjoint(shared_data) -> None:
    manifest = pd.read_csv(shared_data / "paired" / "manifest.csv")
    labels, groups = manifest["label"].tolist(), manifest["sensor_id"].tolist()
    splits = group_split(labels, groups, val_fraction=0.25, seed=0)
    train_keys = set(manifest["sensor_id"][splits == "train"])
    val_keys = set(manifest["sensor_id"][splits == "val"])
    assert train_keys and val_keys and not train_keys & val_keys
    # Every label with two or more sensors is judged on an unseen sensor; park has one sensor.
    val_labels = set(manifest["label"][splits == "val"])
    assert val_labels == {"civic", "commercial", "railway_station", "residential", "school"}
    assert single_group_labels(labels, groups) == ["park"]
    # The benchmark's own split is not place-disjoint: that is why this split exists.
    own = manifest.groupby("split")["sensor_id"].apply(set)
    assert own["train"] & own["val"]


def test_group_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        group_split(["a"], ["g"], val_fraction=1.0, seed=0)
    assert (group_split(["a", "a"], ["g", "g"], val_fraction=0.5, seed=0) == "train").all()
    splits = group_split(["a", "a", "a"], ["g", "h", "h"], val_fraction=0.5, seed=1)
    # Exactly one of the two groups goes to val, whole.
    assert list(splits) in (["val", "train", "train"], ["train", "val", "val"])


def _benchmark_places(shared_data) -> pd.DataFrame:
    manifest = pd.read_csv(shared_data / "paired" / "manifest.csv")
    sensors = pd.read_csv(shared_data / "footfall" / "sensors.csv")
    return manifest.merge(sensors[["sensor_id", "holdout_group"]], on="sensor_id")


def test_group_folds_hold_each_place_out_once_and_cover_the_labels(shared_data) -> None:
    frame = _benchmark_places(shared_data)
    labels, groups = frame["label"].tolist(), frame["holdout_group"].tolist()
    folds = group_folds(labels, groups, folds=5, seed=0)
    frame["fold"] = folds
    # A place is in exactly one fold: it is never on both sides of any fold.
    assert (frame.groupby("holdout_group")["fold"].nunique() == 1).all()
    # A label with one place is never held out; every other row is held out in some fold.
    assert set(frame.loc[folds == -1, "label"]) == {"park"}
    assert set(folds[frame["label"] != "park"]) == set(range(5))
    # A label's places are spread over different folds while there are folds left.
    places = frame.groupby("holdout_group").agg(label=("label", "first"), fold=("fold", "first"))
    for label, part in places[places["fold"] >= 0].groupby("label"):
        assert part["fold"].nunique() == min(len(part), 5), label
    # Folds are of similar size (rows of evaluable labels).
    sizes = np.bincount(folds[folds >= 0])
    assert sizes.max() < 1.6 * sizes.min(), sizes
    # The same seed gives the same folds; another seed (a new repeat) reshuffles them.
    assert (group_folds(labels, groups, folds=5, seed=0) == folds).all()
    assert not (group_folds(labels, groups, folds=5, seed=1) == folds).all()


def test_group_folds_rejects_fewer_than_two_folds() -> None:
    with pytest.raises(ValueError, match="folds must be at least 2"):
        group_folds(["a", "b"], ["g", "h"], folds=1, seed=0)
