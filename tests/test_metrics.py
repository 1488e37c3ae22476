"""Threshold rules, calibration and confusion metrics on known values."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import MedtransferError
from tasks.evaluation.metrics import (
    choose_threshold,
    expected_calibration_error,
    roc_auc,
    split_metrics,
)


def test_youden_threshold_separates_perfectly_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    threshold = choose_threshold(labels, scores, "youden")
    assert 0.35 < threshold <= 0.4
    probabilities = np.stack([1 - scores, scores], axis=1)
    metrics = split_metrics(labels, probabilities, threshold)
    assert metrics.accuracy == 1.0 and metrics.sensitivity == 1.0 and metrics.specificity == 1.0
    assert metrics.confusion == [[3, 0], [0, 3]]


def test_spec_at_90_keeps_specificity() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
    threshold = choose_threshold(labels, scores, "spec@0.9")
    specificity = ((scores < threshold) & (labels == 0)).sum() / (labels == 0).sum()
    assert specificity >= 0.9
    assert choose_threshold(labels, scores, "youden") < threshold  # youden trades specificity away


def test_fixed_threshold_and_bad_rule() -> None:
    assert choose_threshold(np.array([0, 1]), np.array([0.2, 0.9]), "0.5") == 0.5
    with pytest.raises(MedtransferError, match=r"eval\.threshold"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.9]), "best")


def test_calibration_error_of_known_cases() -> None:
    labels = np.array([0, 1, 0, 1])
    perfect = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(labels, perfect) == pytest.approx(0.0)
    overconfident = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # half right at 100%
    assert expected_calibration_error(labels, overconfident) == pytest.approx(0.5)


def test_auc_is_nan_with_one_class() -> None:
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]])))
