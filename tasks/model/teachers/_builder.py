"""Building a teacher: its network, its verified weights, and the cut into parts."""

from __future__ import annotations

from pathlib import Path

from tasks.model.teachers._contract import BuiltTeacher, TeacherSpec
from tasks.model.teachers._registry import get_teacher
from tasks.model.teachers.weights import load_weights, read_state_dict, resolve_weights


def build_teacher(
    teacher: str | TeacherSpec,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    in_channels: int = 3,
) -> BuiltTeacher:
    """Construct a teacher, load (and verify) its weights, and cut it into parts.

    Args:
        teacher: a registered name or a spec.
        pretrained: load weights (bundled, or ``weights_path``); False gives a random init.
        weights_path: a user-supplied weights file for this architecture.
        in_channels: input channels of the stem; pretrained weights need the native 3.

    Returns:
        A :class:`BuiltTeacher` in eval mode whose ``weights`` says what was loaded.
    """
    spec = get_teacher(teacher)
    network = spec.build_network(in_channels)
    weights = None
    if pretrained:
        weights = resolve_weights(spec, weights_path)
        load_weights(spec, network, read_state_dict(weights))
    backbone, classifier = spec.split_network(network)
    backbone.eval()
    classifier.eval()
    return BuiltTeacher(spec=spec, backbone=backbone, classifier=classifier, weights=weights)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2, built exactly (plain torch, MONAI's public drop_connect)
# --------------------------------------------------------------------------------------------
# Our own module rather than MONAI's EfficientNet: MONAI scales stem, head and every stage's
# repeats with the compound coefficients, while Lite keeps the stem (32) and head (1280) fixed
