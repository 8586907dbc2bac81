"""One metric definition: macro-F1 over the classes present in the truth, everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_cohen_kappa,
    multiclass_f1_score,
)

from fusion.experiments import pooled_scores
from fusion.metrics import ClassificationScores, confusion_matrix, macro_f1, scores
from fusion.predict import score


def test_a_predicted_but_absent_class_adds_no_term_to_macro_f1() -> None:
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 2, 1, 1])  # class 2 is predicted once but never true
    values = scores(confusion_matrix(labels, preds, 3))
    # class 0: TP 1, FN 1 -> F1 2/3; class 1: F1 1; class 2 absent from the truth: no term.
    assert values["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert np.isnan(values["f1_per_class"][2])
    # torchmetrics averages a 0 for class 2 in, so two runs on the same rows could average
    # different class sets: the reason this module exists.
    tm = multiclass_f1_score(torch.tensor(preds), torch.tensor(labels), 3, average="macro")
    assert float(tm) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    # Never predicting the absent class cannot change the set of averaged classes either.
    assert macro_f1(labels, np.array([0, 1, 1, 1]), 3) == pytest.approx((2 / 3 + 0.8) / 2)


def test_oa_kappa_and_per_class_f1_agree_with_torchmetrics_when_every_class_is_present() -> None:
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    values = scores(confusion_matrix(labels, preds, 5))
    p, y = torch.tensor(preds), torch.tensor(labels)
    assert values["OA"] == pytest.approx(float(multiclass_accuracy(p, y, 5, average="micro")))
    assert values["kappa"] == pytest.approx(float(multiclass_cohen_kappa(p, y, 5)), abs=1e-6)
    per_class = multiclass_f1_score(p, y, 5, average="none").numpy()
    assert values["f1_per_class"] == pytest.approx(per_class, abs=1e-6)
    assert values["macro_f1"] == pytest.approx(per_class.mean(), abs=1e-6)


def test_training_logs_predict_and_experiments_score_the_same_predictions_alike() -> None:
    classes = ["a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)  # class d is never true ...
    logits = rng.normal(size=(200, 4)) + 2.0 * np.eye(4)[labels]
    logits[:5, 3] = 10.0  # ... but predicted five times
    preds = logits.argmax(axis=1)
    expected = scores(confusion_matrix(labels, preds, 4))

    metric = ClassificationScores(4)  # training and test logs, batch by batch
    for chunk in np.array_split(np.arange(200), 7):
        metric.update(torch.from_numpy(logits[chunk]), torch.from_numpy(labels[chunk]))
    logged = metric.compute()
    predicted = score(logits, labels, preds, temperature=1.0)  # fusion predict
    probs = torch.from_numpy(logits).softmax(dim=1).numpy()
    frame = pd.DataFrame(
        {
            "label": [classes[i] for i in labels],
            "pred": [classes[i] for i in preds],
            **{f"p_{c}": probs[:, k] for k, c in enumerate(classes)},
            "temperature": 1.0,
        }
    )
    pooled = pooled_scores(frame, classes)  # experiments
    for name in ("OA", "macro_f1", "kappa"):
        assert float(logged[name]) == pytest.approx(expected[name], abs=1e-6)
        assert predicted[name] == pytest.approx(expected[name])
        assert pooled[name] == pytest.approx(expected[name])
    assert (logged["confusion"].numpy() == confusion_matrix(labels, preds, 4)).all()
    assert predicted["ece"] == pytest.approx(pooled["ece"], abs=1e-6)
    assert np.isnan(pooled["f1_d"]) and np.isnan(float(logged["f1_per_class"][3]))
