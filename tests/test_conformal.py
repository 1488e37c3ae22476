"""Split conformal prediction sets: the quantile, the APS score and set, measured coverage."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tasks.evaluation.conformal import (
    EVERY_CLASS,
    calibrate,
    conformal_quantile,
    measure,
    report_metrics,
)
from tasks.evaluation.metrics import wilson_interval
from tasks.model.inference import prediction_set
from tasks.model.label_kind import SINGLE_LABEL, image_uniforms

P = np.array([[0.6, 0.3, 0.1]])


def test_the_quantile_is_the_ceil_n_plus_one_times_coverage_th_smallest_score() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9, shuffled
    assert conformal_quantile(scores, 0.8) == 0.8  # rank ceil(10 * 0.8) = 8
    assert conformal_quantile(scores, 0.5) == 0.5  # rank ceil(10 * 0.5) = 5
    assert conformal_quantile(scores, 0.95) == EVERY_CLASS  # rank 10 > n: every class
    assert conformal_quantile(np.arange(1, 20) / 20, 0.95) == 0.95  # rank exactly 19 of 19


def test_the_aps_score_is_the_mass_above_the_true_class_plus_a_draw_of_its_own() -> None:
    three = np.repeat(P, 3, axis=0)
    np.testing.assert_allclose(SINGLE_LABEL.conformal_scores(three, [0, 1, 2]), [0.6, 0.9, 1.0])
    drawn = SINGLE_LABEL.conformal_scores(three, [0, 1, 2], u=np.array([0.5, 0.5, 0.0]))
    np.testing.assert_allclose(drawn, [0.3, 0.6 + 0.15, 0.9])


def test_a_randomised_set_holds_exactly_the_classes_whose_drawn_score_passes() -> None:
    # u = 0.5: class scores 0.3, 0.75, 0.95
    assert SINGLE_LABEL.prediction_sets(P, 0.75, np.array([0.5])).tolist() == [[True, True, False]]
    assert SINGLE_LABEL.prediction_sets(P, 0.74, np.array([0.5])).tolist() == [[True, False, False]]


def test_an_image_draw_is_the_first_52_bits_of_its_hash_as_a_fraction() -> None:
    assert image_uniforms(["8" + "0" * 63, "0" * 64, "4" + "f" * 63]).tolist() == [
        0.5,
        0.0,
        pytest.approx(5 / 16 - 16.0**-13),
    ]


def test_a_set_holds_the_classes_within_the_quantile_and_always_the_top_class() -> None:
    assert SINGLE_LABEL.prediction_sets(P, 0.9).tolist() == [[True, True, False]]
    assert SINGLE_LABEL.prediction_sets(P, 0.6).tolist() == [[True, False, False]]
    # below the top class's own score no class passes: the top class is kept, never empty
    assert SINGLE_LABEL.prediction_sets(P, 0.2).tolist() == [[True, False, False]]
    assert SINGLE_LABEL.prediction_sets(P, EVERY_CLASS).tolist() == [[True, True, True]]


def test_calibration_on_a_tiny_set_gives_the_hand_computed_quantile() -> None:
    # scores 0.6 (label 0), 0.9 (label 1), 1.0 (label 2), 0.7 (p = 0.7, 0.2, 0.1, label 0)
    probs = np.array([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.6, 0.3, 0.1], [0.7, 0.2, 0.1]])
    rule = calibrate(probs, np.array([0, 1, 2, 0]), coverage=0.6)
    # n = 4, rank ceil(5 * 0.6) = 3: the sorted scores 0.6, 0.7, 0.9, 1.0 give 0.9
    assert rule.threshold == pytest.approx(0.9) and rule.n_calibration == 4
    assert rule.sets(P).tolist() == [[True, True, False]]


def test_measured_coverage_carries_the_wilson_interval_and_the_mean_set_size() -> None:
    sets = np.array([[True, False], [True, True], [False, True], [True, False]])
    result = measure(sets, np.array([0, 1, 0, 1]))
    assert (result.n, result.covered, result.rate, result.mean_size) == (4, 2, 0.5, 1.25)
    assert result.interval == wilson_interval(2, 4)


def test_sets_of_a_calibrated_model_cover_new_images_at_the_nominal_rate() -> None:
    # Labels drawn from the probabilities themselves: a perfectly calibrated model, so the
    # calibration and test scores are exchangeable, as the guarantee requires.
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = rng.dirichlet([0.7, 0.7, 0.7], size=n)
        return probs, np.array([rng.choice(3, p=p) for p in probs]), rng.random(n)

    for coverage in (0.9, 0.95):
        probs, labels, u = draw(1000)
        rule = calibrate(probs, labels, coverage, u)
        probs, labels, u = draw(4000)
        result = measure(rule.sets(probs, u), labels)
        # one calibration set's coverage varies about the nominal (sd 0.007-0.009 at n 1000)
        assert abs(result.rate - coverage) < 0.025, (coverage, result)
        assert 1.0 < result.mean_size < 2.9  # informative: neither the top class nor all


def test_a_served_set_names_its_classes_in_class_order_with_its_coverage() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    u = image_uniforms([hashlib.sha256(image.tobytes()).hexdigest()])  # 0.743 for this image
    threshold = 0.6 + u[0] * 0.3  # class 1's drawn score: in, and class 2's (> 0.9) out
    served = prediction_set(P[0], ["clear", "effusion", "mass"], 0.95, threshold, image)
    assert served == {"coverage": 0.95, "labels": ["clear", "effusion"]}
    fewer = prediction_set(P[0], ["clear", "effusion", "mass"], 0.95, threshold - 1e-9, image)
    assert fewer == {"coverage": 0.95, "labels": ["clear"]}
    assert prediction_set(P[0], ["a", "b", "c"], None, None, image) is None  # no rule packaged


def test_report_metrics_flatten_the_block_under_the_prefix_and_drop_non_finite_values() -> None:
    block = {
        "coverage": 0.9,
        "threshold": 0.75,
        "test": {"coverage": 0.8, "ci95": {"low": 0.5, "high": float("nan")}, "mean_set_size": 1.5},
    }
    assert report_metrics(block, "conformal_") == {
        "conformal_coverage_nominal": 0.9,
        "conformal_threshold": 0.75,
        "conformal_test_coverage": 0.8,
        "conformal_test_coverage_ci_low": 0.5,
        "conformal_test_mean_set_size": 1.5,
    }
