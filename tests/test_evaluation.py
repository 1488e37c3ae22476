"""Grad-CAM per predicted class, patient-level bootstrap intervals and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM

from tasks.evaluation.evaluation import GRADCAM_LAYER, gradcam_maps
from tasks.model.student import build_student
from tasks.model.teachers import DEFAULT_TEACHER


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_student(DEFAULT_TEACHER, "partial", 2, unfreeze_blocks=2).eval()
    with torch.no_grad():  # a head that does not favour one class everywhere
        model.head.weight.normal_(0.0, 1.0)
    return model


def test_gradcam_maps_of_a_mixed_batch_equal_each_images_own_map(student) -> None:
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = np.array([0, 1, 1, 0])  # a batch that mixes predicted classes, as the grid does
    maps = gradcam_maps(student, GRADCAM_LAYER, images, classes)
    cam = GradCAM(nn_module=student, target_layers=GRADCAM_LAYER)
    with torch.enable_grad():
        alone = [
            cam(images[i : i + 1].clone().requires_grad_(True), class_idx=int(c)).detach().numpy()
            for i, c in enumerate(classes)
        ]
    assert maps.shape == (4, 1, 64, 64)
    np.testing.assert_allclose(maps, np.concatenate(alone), atol=1e-5)
    # and the class matters: the other class's map of the same image differs
    other = gradcam_maps(student, GRADCAM_LAYER, images[:1], np.array([1]))
    assert np.abs(other[0] - maps[0]).max() > 0.05
