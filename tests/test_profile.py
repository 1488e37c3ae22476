"""The training profile's parts on known values: the OOD scores, the conformal threshold, the
scope gate's message, the image statistics."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.model.profile import OodDetector, Scope, image_statistics


def test_knn_score_is_the_cosine_distance_to_the_kth_nearest_training_feature() -> None:
    detector = OodDetector.fit("knn", np.eye(6), np.zeros(6), head=None)
    # k = 5 of 6 references: for e1 the similarities are 1, 0, 0, 0, 0, 0 -> 5th largest is 0.
    assert detector.score(np.eye(6)[:1]) == pytest.approx([1.0])
    # A feature along e1 + e2: similarities 0.707 twice, 0 four times -> 5th largest is 0.
    assert detector.score(np.array([[1.0, 1.0, 0, 0, 0, 0]])) == pytest.approx([1.0])
    # Six copies of e1 as references: every neighbour is at distance 0.
    near = OodDetector.fit("knn", np.tile(np.eye(6)[:1], (6, 1)), np.zeros(6), head=None)
    assert near.score(np.eye(6)[:1] * 3) == pytest.approx([0.0], abs=1e-12)


def test_knn_score_is_pinned_to_the_fifth_neighbour_by_graded_references() -> None:
    # Eight references whose cosine similarities to the query e1 are 0.95, 0.85, ..., 0.25
    # (unit vectors at angle arccos(s) from e1), shuffled: the 1st..8th nearest each give a
    # different score, 1 - s, so only k = 5 gives 1 - 0.55 = 0.45.
    similarities = np.array([0.55, 0.95, 0.35, 0.75, 0.25, 0.85, 0.45, 0.65])
    references = np.stack([similarities, np.sqrt(1 - similarities**2)], axis=1) * 3.0
    detector = OodDetector.fit("knn", references, np.zeros(8), head=None)
    assert detector.score(np.array([[2.0, 0.0]])) == pytest.approx([0.45], abs=1e-6)


def test_mahalanobis_score_is_zero_at_a_class_mean_and_grows_away_from_it() -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(5, 1, (200, 3))])
    labels = np.repeat([0, 1], 200)
    detector = OodDetector.fit("mahalanobis", features, labels, head=None)
    means = detector.arrays["means"]
    at_means = detector.score(means)
    far = detector.score(means + 20)
    assert at_means == pytest.approx([0.0, 0.0], abs=1e-5) and (far > 10).all()


def test_energy_score_is_minus_logsumexp_of_the_logits() -> None:
    head = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.0, 0.0]))
    detector = OodDetector.fit("energy", np.zeros((1, 2)), np.zeros(1), head=head)
    assert detector.score(np.array([[0.0, 0.0]])) == pytest.approx([-np.log(2.0)])


def test_the_threshold_is_the_conformal_quantile_of_validation_scores() -> None:
    detector = OodDetector("knn", {}, threshold=0.0)
    detector.calibrate(np.arange(1.0, 79.0), 0.05)  # n = 78: the ceil(79 * 0.95) = 76th
    assert detector.threshold == 76.0
    detector.calibrate(np.arange(1.0, 101.0), 0.1)  # n = 100: the ceil(101 * 0.9) = 91st
    assert detector.threshold == 91.0


def test_the_scope_gate_names_what_was_expected_and_never_the_uploads_value() -> None:
    scope = Scope({"Modality": ["CR", "DX"], "BodyPartExamined": ["", "CHEST"]})
    assert scope.violation({"Modality": "CR", "BodyPartExamined": ""}) is None
    message = scope.violation({"Modality": "CT", "BodyPartExamined": "HEAD"})
    assert message == " The model was trained on Modality CR, DX only."
    message = scope.violation({"Modality": "DX", "BodyPartExamined": "HEAD"})
    assert message == " The model was trained on BodyPartExamined (absent), CHEST only."


def test_image_statistics_of_known_images() -> None:
    images = np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)])
    images[0, 0, :2] = 255  # two saturated-bright pixels in a black image: all 16 saturated
    stats = image_statistics(images)
    assert stats[0] == pytest.approx([2 / 16, np.sqrt(2 / 16 * 14 / 16), 1.0])
    assert stats[1] == pytest.approx([1.0, 0.0, 1.0])


def test_a_colour_images_statistics_are_pooled_then_per_channel() -> None:
    from tasks.model.profile import STATISTICS, statistic_names

    image = np.zeros((1, 3, 2, 2), np.uint8)
    image[0, 0] = 255  # red all saturated-bright, green all black
    image[0, 2] = [[0, 51], [102, 153]]  # blue 0, 0.2, 0.4, 0.6
    stats = image_statistics(image)
    assert statistic_names(1) == STATISTICS  # a gray model's names, as before colour
    assert statistic_names(3)[3:6] == ("mean_r", "std_r", "saturated_r")
    assert stats.shape == (1, 12)
    pooled_mean = 5.2 / 12  # four 1s and 0.2 + 0.4 + 0.6, over 12 values
    pooled = [pooled_mean, np.sqrt(4.56 / 12 - pooled_mean**2), 9 / 12]
    assert stats[0] == pytest.approx(
        [*pooled, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.3, np.sqrt(0.05), 0.25]
    )
