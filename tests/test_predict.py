"""The one forward pass (tasks.model.predict): known outputs of a model with known weights,
batching that changes nothing, eval mode, no gradients, empty inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.data.preprocess import uint8_to_model_pixels
from tasks.errors import MedtransferError
from tasks.model.predict import probabilities_and_labels, run_model


def _mean_pixel_model() -> nn.Module:
    """``(B, 1, 2, 2)`` → logits ``(B, 2)`` = ``(0, 4 * mean pixel)``, with a dropout that
    would zero everything in training mode."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), nn.Dropout(p=1.0), linear)


def test_logits_probabilities_and_classes_have_their_known_values() -> None:
    images = np.array([np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.5)], dtype=np.float32)
    model = _mean_pixel_model().train()
    logits = run_model(model, images, output="logits")
    np.testing.assert_array_equal(logits, [[0.0, 0.0], [0.0, 2.0]])
    assert not model.training  # eval mode: the dropout did nothing
    probabilities = run_model(model, images, temperature=2.0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities[1], [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
    np.testing.assert_array_equal(probabilities[0], [0.5, 0.5])
    classes = run_model(model, torch.from_numpy(images), output="classes", batch_size=1)
    assert classes.dtype == np.int64 and classes.tolist() == [0, 1]


def test_batching_and_a_loader_give_the_same_answers_without_gradients() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((7, 1, 2, 2), dtype=np.float32)
    model = _mean_pixel_model()
    whole = run_model(model, images)
    np.testing.assert_array_equal(run_model(model, images, batch_size=3), whole)
    labels = np.arange(7) % 2
    loader = [
        (torch.from_numpy(images[i : i + 2]), torch.from_numpy(labels[i : i + 2]))
        for i in range(0, 7, 2)
    ]
    found, found_labels = probabilities_and_labels(model, loader)
    np.testing.assert_array_equal(found, whole)
    np.testing.assert_array_equal(found_labels, labels)
    assert all(p.grad is None for p in model.parameters())


def test_no_images_give_empty_answers_and_a_bad_batch_size_is_one_line() -> None:
    empty = np.zeros((0, 1, 2, 2), np.float32)
    assert run_model(_mean_pixel_model(), empty, output="classes").shape == (0,)
    assert run_model(_mean_pixel_model(), empty).shape == (0, 0)
    with pytest.raises(MedtransferError, match="batch_size must be at least 1"):
        run_model(_mean_pixel_model(), np.zeros((2, 1, 2, 2), np.float32), batch_size=0)


def test_uint8_images_become_one_channel_pixels_in_zero_to_one() -> None:
    images = np.array([[[0, 255], [51, 128]]], dtype=np.uint8)
    pixels = uint8_to_model_pixels(images)
    assert pixels.dtype == np.float32 and pixels.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(pixels[0, 0], np.float32([[0, 1], [0.2, 128 / 255]]))
