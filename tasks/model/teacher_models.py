"""The pristine teacher, for attacks and sanity checks: frozen copies built from the teacher's
weights file, never from a student.

:func:`teacher_feature_extractor` gives the attacks their public model (the teacher-transfer
and universal perturbations are crafted on it, so they know nothing the student learned);
:func:`imagenet_classifier` checks that the bundled weights still name ImageNet's classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.model.student import check_input, freeze, input_and_backbone
from tasks.model.teachers import (
    Backbone,
    Normalise,
    TeacherSpec,
    build_teacher,
    get_teacher,
)


class _FrozenTeacher(nn.Module):
    """A teacher that never trains: no parameter needs a gradient, and ``train()`` is ignored."""

    def train(self, mode: bool = True) -> _FrozenTeacher:
        return super().train(False)


class TeacherFeatures(_FrozenTeacher):
    """Pristine pretrained teacher: ``(B, C, H, W)`` in [0, 1] → pooled features ``(B, D)``."""

    def __init__(
        self, spec: TeacherSpec, input_layer: nn.Module, backbone: Backbone, channels: int = 1
    ) -> None:
        super().__init__()
        self.teacher = spec.name
        self.channels = channels
        self._input_rule = (spec.size_multiple, spec.min_image_size)
        self.input_layer = input_layer
        self.backbone = backbone
        freeze(self)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.teacher, self.channels, *self._input_rule)
        return self.backbone(self.input_layer(x))


class ImageNetClassifier(_FrozenTeacher):
    """The full teacher: ``(B, 3, H, W)`` RGB in [0, 1] → ImageNet logits ``(B, 1000)``."""

    def __init__(self, spec: TeacherSpec, backbone: Backbone, classifier: nn.Linear) -> None:
        super().__init__()
        self.teacher = spec.name
        self._input_rule = (spec.size_multiple, spec.min_image_size)
        self.normalise = Normalise(spec.normalisation)
        self.backbone = backbone
        self.classifier = classifier
        freeze(self)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.teacher, 3, *self._input_rule)
        return self.classifier(self.backbone(self.normalise(x)))


def teacher_feature_extractor(
    teacher: str | TeacherSpec, weights_path: str | Path | None = None, channels: int = 1
) -> TeacherFeatures:
    """A freshly loaded, frozen copy of the pretrained teacher's feature extractor.

    Same input as a student of ``channels`` ([0, 1]), output the teacher's pooled penultimate
    features. It is built from the weights file, never from a student, so an attack crafted on
    it knows nothing the student learned.
    """
    spec = get_teacher(teacher)
    input_layer, backbone, _ = input_and_backbone(spec, True, weights_path, channels)
    return TeacherFeatures(spec, input_layer, backbone, channels)


def imagenet_classifier(
    teacher: str | TeacherSpec, weights_path: str | Path | None = None
) -> ImageNetClassifier:
    """The pretrained 1000-class teacher on RGB [0, 1] input, frozen (for sanity checks)."""
    spec = get_teacher(teacher)
    built = build_teacher(spec, pretrained=True, weights_path=weights_path)
    return ImageNetClassifier(spec, built.backbone, built.classifier)
