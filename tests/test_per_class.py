"""Per-class figures of a model with more than two classes: known values worked by hand, the
bootstrap's weighted form, and the macro AUC of a resample that misses a class."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.evaluation.metrics import patient_weights, roc_auc, weighted_auc
from tasks.evaluation.per_class import class_measures, flat_metrics, per_class_report
from tasks.registry.model_card import CardInputs, render_model_card

# Six images, two per class. Top classes: 0, 1 | 1, 2 | 2, 2.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.3, 0.6],
        [0.1, 0.1, 0.8],
        [0.1, 0.2, 0.7],
    ]
)
PREDICTED = PROBS.argmax(axis=1)


def test_each_class_gets_its_hand_worked_auc_sensitivity_precision_and_the_balanced_accuracy():
    report = per_class_report(LABELS, PROBS, PREDICTED, ["a", "b", "c"], np.arange(6), 0, 0)
    rows = {row["class"]: row for row in report["classes"]}
    # class b: its images score 0.5 and 0.3 against 0.2, 0.6, 0.1, 0.2: 6 of 8 pairs won
    assert [rows[c]["auc"] for c in "abc"] == [1.0, 0.75, 1.0]
    # recall: a 1 of 2, b 1 of 2, c 2 of 2; precision: a 1 of 1, b 1 of 2, c 2 of 3
    assert [rows[c]["sensitivity"] for c in "abc"] == [0.5, 0.5, 1.0]
    assert [rows[c]["precision"] for c in "abc"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    assert [rows[c]["n"] for c in "abc"] == [2, 2, 2]
    assert "auc_ci95" not in rows["a"]  # no resamples, no interval


def test_weighted_figures_equal_the_figures_of_the_images_repeated():
    counts = np.array([[2, 0, 1, 3, 1, 1]])
    repeated = np.repeat(np.arange(6), counts[0])
    weighted = class_measures(LABELS, PROBS, PREDICTED, counts.astype(float))
    plain = class_measures(
        LABELS[repeated], PROBS[repeated], PREDICTED[repeated], np.ones((1, len(repeated)))
    )
    for name in ("auc", "sensitivity", "precision", "balanced_accuracy"):
        np.testing.assert_allclose(weighted[name], plain[name])


def test_intervals_hold_the_figure_and_a_class_never_drawn_is_nan_in_that_row():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], 60) + 0.3 * np.eye(3)[labels]
    probs /= probs.sum(axis=1, keepdims=True)
    report = per_class_report(
        labels, probs, probs.argmax(1), ["a", "b", "c"], np.arange(60), 300, 4
    )
    for row in report["classes"]:
        for name in ("auc", "sensitivity", "precision"):
            assert row[f"{name}_ci95"]["low"] <= row[name] <= row[f"{name}_ci95"]["high"]
    low, high = report["balanced_accuracy_ci95"].values()
    assert low < report["balanced_accuracy"] < high
    no_class_2 = np.where(labels == 2, 0.0, 1.0)[None]
    drawn = class_measures(labels, probs, probs.argmax(1), no_class_2)
    assert np.isnan(drawn["sensitivity"][2, 0]) and np.isnan(drawn["auc"][2, 0])
    assert np.isfinite(drawn["balanced_accuracy"][0])


def test_the_macro_auc_of_a_resample_is_sklearns_and_a_missing_class_is_left_out():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    probs = rng.dirichlet([1, 1, 1], 40)
    weights = patient_weights(np.arange(40), 20, 0)
    for row, value in zip(weights.astype(int), weighted_auc(labels, probs, weights), strict=True):
        index = np.repeat(np.arange(40), row)
        expected = roc_auc_score(labels[index], probs[index], multi_class="ovr", average="macro")
        assert value == pytest.approx(expected)
    # a resample without class 2 (small test splits draw these): the mean of classes 0 and 1
    without = np.where(labels == 2, 0.0, 1.0)[None]
    kept = labels != 2
    expected = np.mean([roc_auc_score(labels[kept] == c, probs[kept, c]) for c in (0, 1)])
    assert weighted_auc(labels, probs, without)[0] == pytest.approx(expected)


def test_mlflow_metrics_are_named_by_class_index_and_the_card_by_class_name():
    report = per_class_report(LABELS, PROBS, PREDICTED, ["a", "b", "c"], np.arange(6), 50, 0)
    flat = flat_metrics(report, "test")
    assert flat["test_auc_class1"] == 0.75 and flat["test_precision_class2"] == pytest.approx(2 / 3)
    assert {"test_balanced_accuracy_ci_low", "test_sensitivity_class0_ci_high"} <= set(flat)
    metrics = {
        "threshold": 0.5,
        "test": {
            "per_class": report["classes"],
            "balanced_accuracy": report["balanced_accuracy"],
            "confusion": [[1, 1, 0], [0, 1, 1], [0, 0, 2]],
        },
    }
    card = render_model_card(
        CardInputs("m", "1", "r", {"classes": ["a", "b", "c"]}, "d", {}, metrics, None, False, "c")
    )
    assert "| decision | the most probable class (no threshold) |" in card
    assert "| b | 2 | 0.750 [" in card
    assert "| c | 0 | 0 | 2 |" in card  # the confusion row of class c, by count


def test_a_validation_split_missing_a_class_gets_the_macro_auc_of_the_classes_it_holds():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 2], 10)  # class 1 absent, as in a small split of a rare class
    probs = rng.dirichlet([1, 1, 1], 20)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 2)])
    assert roc_auc(labels, probs) == pytest.approx(expected)
    full = rng.integers(0, 3, 30)
    probs = rng.dirichlet([1, 1, 1], 30)
    assert roc_auc(full, probs) == roc_auc_score(full, probs, multi_class="ovr", average="macro")
