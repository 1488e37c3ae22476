"""Threshold rules, calibration and confusion metrics on known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.errors import MedtransferError
from tasks.evaluation.metrics import (
    apply_temperature,
    binary_auc,
    bootstrap_intervals,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    percentile_interval,
    roc_auc,
    split_metrics,
    stratified_weights,
    weighted_metrics,
    wilson_interval,
)


def test_youden_threshold_separates_perfectly_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    threshold = choose_threshold(labels, scores, "youden")
    assert threshold == 0.4  # the lowest positive score: ROC thresholds are the scores
    probabilities = np.stack([1 - scores, scores], axis=1)
    metrics = split_metrics(labels, probabilities, threshold)
    assert metrics.accuracy == 1.0 and metrics.sensitivity == 1.0 and metrics.specificity == 1.0
    assert metrics.confusion == [[3, 0], [0, 3]]


def test_spec_at_90_keeps_specificity() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 400), 0, 1)
    threshold = choose_threshold(labels, scores, "spec@0.9")
    negatives_below = ((scores < threshold) & (labels == 0)).sum()
    # The most sensitive threshold at specificity >= 0.9 keeps exactly the fewest negatives that
    # reach 0.9 below it (no tied scores here): 162 of 179, specificity 0.905.
    assert (labels == 0).sum() == 179 and negatives_below == math.ceil(0.9 * 179) == 162
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


def test_calibration_error_and_reliability_curve_of_a_known_mix_with_a_bin_edge() -> None:
    """Bins are (low, high]: confidence 0.5 sits in (0.4, 0.5]. By hand: bins (0.4, 0.5] {1
    right at 0.5}, (0.5, 0.6] {wrong at 0.55, right at 0.6}, (0.7, 0.8] {right at 0.75},
    (0.9, 1] {wrong at 0.95}: ECE = (0.5 + 2 x 0.075 + 0.25 + 0.95) / 5 = 0.37."""
    from tasks.evaluation.metrics import _weighted_ece, reliability_curve

    labels = np.array([0, 0, 1, 0, 0])
    probabilities = np.array([[0.5, 0.5], [0.45, 0.55], [0.25, 0.75], [0.05, 0.95], [0.6, 0.4]])
    points = reliability_curve(labels, probabilities)
    assert [p["n"] for p in points] == [1, 2, 1, 1]
    assert [p["confidence"] for p in points] == pytest.approx([0.5, 0.575, 0.75, 0.95])
    assert [p["accuracy"] for p in points] == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.37)
    # the bootstrap's vectorised ECE uses the same bins: total weight x ECE
    assert _weighted_ece(labels, probabilities, np.ones((1, 5)))[0] == pytest.approx(1.85)


def test_auc_is_nan_with_one_class() -> None:
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]])))


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * 0.25 + rng.normal(0.4, 0.2, n), 0.001, 0.999).round(2)  # ties too
    return labels, np.stack([1 - scores, scores], axis=1)


def test_weighted_metrics_equal_split_metrics_on_images_repeated_by_their_weights() -> None:
    labels, probabilities = _scores(40, seed=1)
    weights = np.random.default_rng(2).integers(0, 4, (5, 40)).astype(float)
    values = weighted_metrics(labels, probabilities, 0.5, weights)
    for row in range(5):
        index = np.repeat(np.arange(40), weights[row].astype(int))
        expected = split_metrics(labels[index], probabilities[index], 0.5)
        for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
            assert values[name][row] == pytest.approx(getattr(expected, name)), name


def test_bootstrap_resamples_patients_so_copies_of_one_patients_image_add_no_certainty() -> None:
    labels, probabilities = _scores(30, seed=3)
    once = bootstrap_intervals(labels, probabilities, 0.5, np.arange(30), 500, seed=7)
    # every patient now has five identical images: the evidence is the same 30 patients
    five = bootstrap_intervals(
        np.repeat(labels, 5),
        np.repeat(probabilities, 5, axis=0),
        0.5,
        np.repeat(np.arange(30), 5),
        500,
        seed=7,
    )
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ece"):
        assert five[name] == pytest.approx(once[name]), name
    point = split_metrics(labels, probabilities, 0.5)
    assert once["auc"][0] < point.auc < once["auc"][1]
    assert once["auc"][1] - once["auc"][0] > 0.1  # 30 patients do not pin an AUC down


def test_bootstrap_is_seeded() -> None:
    labels, probabilities = _scores(30, seed=3)
    groups = np.arange(30) // 2
    first = bootstrap_intervals(labels, probabilities, 0.5, groups, 200, seed=1)
    assert bootstrap_intervals(labels, probabilities, 0.5, groups, 200, seed=1) == first
    assert bootstrap_intervals(labels, probabilities, 0.5, groups, 200, seed=2) != first


def test_wilson_interval_of_known_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(32, 32)[0] == pytest.approx(0.8928, abs=1e-4)
    assert wilson_interval(5, 100) == pytest.approx((0.02154, 0.11175), abs=1e-4)
    # No trials, no proportion: undefined (null in a report), not a (0, 1) that reads as measured.
    assert all(np.isnan(wilson_interval(0, 0)))


def test_temperature_fitted_on_overconfident_scores_recovers_the_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 3))
    truth = np.exp(logits / 2.0)  # labels drawn at temperature 2: the raw softmax overconfides
    truth /= truth.sum(1, keepdims=True)
    labels = (rng.random(20000)[:, None] > truth.cumsum(1)).sum(1)
    raw = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    temperature = fit_temperature(labels, raw)
    assert temperature == pytest.approx(2.0, abs=0.08)
    calibrated = apply_temperature(raw, temperature)
    assert expected_calibration_error(labels, calibrated) < 0.02
    assert expected_calibration_error(labels, raw) > 0.1
    np.testing.assert_allclose(calibrated, truth, atol=0.03)
    np.testing.assert_allclose(apply_temperature(raw, 1.0), raw, atol=1e-6)


def test_the_one_binary_auc_counts_pairs_won_and_ties_as_half_with_or_without_weights() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert binary_auc(labels, scores) == 0.75  # 0.35 loses to 0.4; three of four pairs won
    assert binary_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.9])) == 0.75  # ties 1/2
    rows = np.array([[2, 1, 0, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=float)
    by_row = binary_auc(labels, scores, rows)
    assert by_row[:2].tolist() == [1.0, 0.5] and np.isnan(by_row[2])  # row 3: no positive
    probabilities = np.stack([1 - scores, scores], axis=1)
    assert roc_auc(labels, probabilities) == 0.75


def test_stratified_weights_redraw_each_class_keeping_its_size() -> None:
    strata = np.array([0, 0, 0, 1, 1])
    weights = stratified_weights(strata, 50, seed=3)
    assert weights.shape == (50, 5)
    assert (weights[:, :3].sum(1) == 3).all() and (weights[:, 3:].sum(1) == 2).all()
    assert (stratified_weights(strata, 50, seed=3) == weights).all()


def test_a_percentile_interval_ignores_undefined_draws_and_is_nan_without_any() -> None:
    draws = np.concatenate([np.arange(1, 1001, dtype=float), [np.nan] * 10])
    assert percentile_interval(draws) == pytest.approx((25.975, 975.025))
    assert all(np.isnan(percentile_interval(np.array([np.nan]))))
