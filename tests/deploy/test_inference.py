"""The serving preprocessing (tasks/model/inference.py) in process: same path as training, clear
rejections, and the label rule."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data import dicom_io
from tasks.data.preprocess import resize_display, uint8_to_display
from tasks.model.inference import (
    REJECTIONS,
    InputRejected,
    Predictor,
    decide,
    prepare_dicom,
    prepare_png,
)
from tasks.model.profile import features_and_probabilities
from tests.deploy.samples import (
    GOOD_DICOM,
    SECRET_ID,
    SECRET_NAME,
    bad_inputs,
    corpus_bytes,
    identified_dicom,
    png_bytes,
)
from tests.deploy.students import SERVED_TEMPERATURE, reference_probabilities


@pytest.mark.parametrize("name", GOOD_DICOM)
def test_a_dicom_upload_is_prepared_exactly_as_ingestion_prepares_it(name: str) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    expected = resize_display(dicom_io.decode_file(path).frames[0], 64)  # the ingestion path
    from_bytes = prepare_dicom(corpus_bytes(name), 64)
    assert from_bytes.dtype == np.uint8 and from_bytes.shape == (64, 64)
    np.testing.assert_array_equal(from_bytes, expected)
    np.testing.assert_array_equal(prepare_dicom(path, 64), expected)


# Size and content type are the HTTP layer's to check (tests/deploy/test_serving.py).
CONTENT_REJECTIONS = [b for b in bad_inputs(1 << 20, 1024) if b.status not in (413, 415)]


@pytest.mark.parametrize("bad", CONTENT_REJECTIONS, ids=lambda b: b.name)
def test_every_bad_dicom_or_png_content_is_rejected_with_its_reason(bad) -> None:
    prepare = prepare_dicom if bad.route == "/classify/dicom" else prepare_png
    with pytest.raises(InputRejected) as caught:
        prepare(bad.body, 64, 1024)
    assert (caught.value.status, caught.value.reason) == (bad.status, bad.reason)
    assert caught.value.message == REJECTIONS[bad.reason][1]


def test_rejection_messages_never_quote_the_upload() -> None:
    for frames in (1, 3):
        data = identified_dicom(frames=frames)
        for cut in (len(data), len(data) - 100, 400):
            try:
                prepare_dicom(data[:cut], 64)
            except InputRejected as err:
                text = f"{err} {err.to_dict()}"
                assert SECRET_NAME not in text and SECRET_ID not in text
                assert "Secretname" not in text


def test_png_modes_become_the_same_grayscale_image() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(50, 70), dtype=np.uint8)
    expected = resize_display(uint8_to_display(gray), 32)
    np.testing.assert_array_equal(prepare_png(png_bytes(gray), 32), expected)
    # Grey replicated into RGB, and with an alpha channel: luma of equal channels is the grey.
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_allclose(prepare_png(png_bytes(rgb), 32), expected, atol=1)
    rgba = np.concatenate([rgb, np.full((50, 70, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(prepare_png(png_bytes(rgba), 32), expected, atol=1)
    # 16-bit grey: value v * 257 is the 8-bit value v.
    wide = gray.astype(np.uint16) * 257
    np.testing.assert_allclose(prepare_png(png_bytes(wide), 32), expected, atol=1)


def test_a_png_larger_than_the_limit_is_refused_before_decoding() -> None:
    big = np.zeros((20, 300), dtype=np.uint8)
    with pytest.raises(InputRejected) as caught:
        prepare_png(png_bytes(big), 32, max_image_dim=256)
    assert caught.value.reason == "image_too_large" and caught.value.status == 422


def test_label_rule_uses_the_validation_threshold_for_two_classes() -> None:
    classes = ("normal", "opacity")
    assert decide(np.array([0.65, 0.35]), classes, threshold=0.3).label == "opacity"
    assert decide(np.array([0.65, 0.35]), classes, threshold=0.4).label == "normal"
    assert decide(np.array([0.65, 0.35]), classes, threshold=None).label == "normal"
    three = decide(np.array([0.2, 0.5, 0.3]), ("a", "b", "c"), threshold=0.1)
    assert three.label == "b" and three.probabilities == {"a": 0.2, "b": 0.5, "c": 0.3}


def test_predictor_answers_softmax_of_the_saved_logits_over_the_saved_temperature(
    students,
) -> None:
    # Student a is saved with temperature SERVED_TEMPERATURE (1.7); the expected numbers are a
    # plain forward of its saved weights, softmax(logits / 1.7), none of the serving code.
    student = students["a"]
    predictor = Predictor.from_folder(student.model_dir)
    images = np.stack([prepare_dicom(corpus_bytes(n), 64) for n in GOOD_DICOM[:4]])
    expected = reference_probabilities(student.model_dir, images, SERVED_TEMPERATURE)
    uncalibrated = reference_probabilities(student.model_dir, images, 1.0)
    # The temperature matters here: ignoring it would move some probability by > 0.01.
    assert np.abs(expected - uncalibrated).max() > 0.01
    got = predictor.predict_images(images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got[:, 1]) > 1e-3  # the images really give different answers
    # The Bento's model worker computes its probabilities with the profile's one-pass helper.
    probs, features = features_and_probabilities(
        predictor.model, images, predictor.spec.temperature
    )
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert features.shape == (4, predictor.model.head.in_features)
    single = predictor.predict_dicom(corpus_bytes(GOOD_DICOM[0]))
    np.testing.assert_allclose(single, expected[0], atol=1e-5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        predictor.predict_images(images[:, :32, :32])
