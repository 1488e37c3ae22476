"""The multi-label kind and its figures on known values: BCE with per-finding positive weights,
a sigmoid per finding with its own temperature and threshold, per-finding AUC, sensitivity and
specificity, macro and micro AUC, unknown labels left out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tasks.evaluation.metrics import choose_threshold
from tasks.evaluation.multilabel import (
    choose_thresholds,
    finding_measures,
    fit_temperatures,
    multilabel_report,
)
from tasks.model.label_kind import MULTI_LABEL, positive_weights

NAN = float("nan")


def test_the_loss_is_binary_cross_entropy_with_each_findings_positive_weight() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = 0.75, 0.5
    labels = torch.tensor([[1.0, 0.0]])
    plain = float(MULTI_LABEL.loss()(logits, labels))
    assert plain == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    weighted = float(MULTI_LABEL.loss(torch.tensor([4.0, 4.0]))(logits, labels))
    # the positive term (finding 1) counts 4 times, the negative one (finding 2) once
    assert weighted == pytest.approx((-4 * math.log(0.75) - math.log(0.5)) / 2)


def test_positive_weights_are_negatives_over_positives_among_known_labels() -> None:
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, NAN, 1], [0, 1, NAN]])
    # finding 1: 1 positive, 3 negatives; finding 2: 1 and 2 (one unknown); finding 3: none
    assert positive_weights(labels).tolist() == [3.0, 2.0, 1.0]


def test_each_finding_has_its_own_sigmoid_temperature_and_threshold() -> None:
    logits = torch.tensor([[math.log(3.0), math.log(3.0)]])
    probs = MULTI_LABEL.probabilities(logits, torch.tensor([1.0, 2.0]))[0]
    # T = 2 halves the logit: odds sqrt(3)
    assert probs.tolist() == pytest.approx([0.75, math.sqrt(3) / (1 + math.sqrt(3))])
    rescaled = MULTI_LABEL.rescale(np.array([[0.75, 0.75]]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(rescaled[0], probs.numpy(), rtol=1e-6)
    decided = MULTI_LABEL.decide(np.array([[0.3, 0.3], [0.6, 0.2]]), np.array([0.25, 0.5]))
    assert decided.tolist() == [[1, 0], [1, 0]]
    assert MULTI_LABEL.decide(np.array([[0.5, 0.49]]), None).tolist() == [[1, 0]]


def test_per_finding_figures_are_hand_worked_and_unknown_labels_are_left_out() -> None:
    labels = np.array([[1, 0], [1, 1], [0, NAN], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.4, 0.8], [0.5, 0.99], [0.3, 0.6], [0.1, 0.7]])
    measures = finding_measures(labels, probs, np.array([0.35, 0.65]), np.ones((1, 5)))
    # finding 1: positives 0.9, 0.4 beat 0.5, 0.3, 0.1 except 0.4 < 0.5: 5 of 6 pairs
    # finding 2 (image 3 unknown): positives 0.8, 0.6 against 0.2, 0.7: 3 of 4 pairs
    np.testing.assert_allclose(measures["auc"][:, 0], [5 / 6, 3 / 4])
    # finding 1 at 0.35: both positives found, 0.5 is a false alarm (2 of 3 negatives right)
    # finding 2 at 0.65: 0.8 found, 0.6 missed; 0.2 right, 0.7 a false alarm
    np.testing.assert_allclose(measures["sensitivity"][:, 0], [1.0, 0.5])
    np.testing.assert_allclose(measures["specificity"][:, 0], [2 / 3, 0.5])
    assert measures["macro_auc"][0] == pytest.approx((5 / 6 + 3 / 4) / 2)
    known = np.isfinite(labels).all(axis=1)
    assert measures["micro_auc"][0] != pytest.approx(
        roc_auc_score(labels[known], probs[known], average="micro")
    )  # the unknown cell is left out, not the whole image
    pooled = np.isfinite(labels).ravel()
    expected = roc_auc_score(labels.ravel()[pooled], probs.ravel()[pooled])
    assert measures["micro_auc"][0] == pytest.approx(expected)


def test_macro_and_micro_auc_are_sklearns_on_fully_known_labels_and_weights_repeat_images():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) < [0.2, 0.5, 0.3]).astype(float)
    probs = np.clip(0.3 * labels + rng.random((40, 3)) * 0.7, 0, 1)
    measures = finding_measures(labels, probs, np.full(3, 0.5), np.ones((1, 40)))
    assert measures["macro_auc"][0] == pytest.approx(roc_auc_score(labels, probs, average="macro"))
    assert measures["micro_auc"][0] == pytest.approx(roc_auc_score(labels, probs, average="micro"))
    counts = rng.integers(0, 3, (1, 40))
    index = np.repeat(np.arange(40), counts[0])
    weighted = finding_measures(labels, probs, np.full(3, 0.5), counts.astype(float))
    repeated = finding_measures(
        labels[index], probs[index], np.full(3, 0.5), np.ones((1, len(index)))
    )
    for name in ("auc", "sensitivity", "specificity", "macro_auc", "micro_auc"):
        np.testing.assert_allclose(weighted[name], repeated[name])


def test_each_finding_gets_the_temperature_that_generated_it_and_its_own_threshold() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (20000, 2))
    true_t = np.array([0.5, 2.0])
    labels = (rng.random((20000, 2)) < 1 / (1 + np.exp(-logits / true_t))).astype(float)
    probs = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(fit_temperatures(labels, probs), true_t, rtol=0.05)
    labels[:5, 1] = NAN
    thresholds = choose_thresholds(labels, probs, "youden")
    assert thresholds[0] == choose_threshold(labels[:, 0].astype(int), probs[:, 0], "youden")
    assert thresholds[1] == choose_threshold(labels[5:, 1].astype(int), probs[5:, 1], "youden")


def test_the_report_gives_every_finding_and_average_a_patient_bootstrap_interval() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random((60, 2)) < 0.4).astype(float)
    probs = np.clip(0.4 * labels + 0.6 * rng.random((60, 2)), 0, 1)
    report = multilabel_report(
        labels, probs, np.array([0.5, 0.5]), ["effusion", "nodule"], np.arange(60) // 2, 300, 0
    )
    assert [row["finding"] for row in report["findings"]] == ["effusion", "nodule"]
    assert [row["n_positive"] for row in report["findings"]] == labels.sum(axis=0).tolist()
    for row in report["findings"]:
        for name in ("auc", "sensitivity", "specificity"):
            assert row[f"{name}_ci95"]["low"] <= row[name] <= row[f"{name}_ci95"]["high"]
    for name in ("macro_auc", "micro_auc"):
        assert report[f"{name}_ci95"]["low"] < report[name] < report[f"{name}_ci95"]["high"]
