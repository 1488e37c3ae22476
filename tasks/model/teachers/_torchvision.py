"""What the torchvision-layout teachers (ResNet, DenseNet) share: ImageNet's mean and std, the
key conversion of torchvision's state dicts, and their registration (the user brings the file).

Plain torch, parameter names exactly torchvision's (no torchvision dependency): a state dict
saved from torchvision.models.resnet50() or densenet121() loads strictly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from tasks.model.teachers._contract import Backbone, Normalisation, TeacherSpec
from tasks.model.teachers._registry import register_teacher

IMAGENET_MEAN_STD = Normalisation.from_mean_std((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _torchvision_keys(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """torchvision's layout as it is; old DenseNet files' ``norm.1`` → ``norm1`` (as torchvision
    itself renames them) and a ``module.`` prefix (DataParallel) dropped."""
    old_dense = re.compile(r"(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:.+))$")
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        match = old_dense.fullmatch(key)
        converted[match[1] + match[2] if match else key] = value
    return converted


def register_torchvision_teacher(
    name: str,
    build: Callable[[int], nn.Module],
    split: Callable[[nn.Module], tuple[Backbone, nn.Linear]],
    feature_dim: int,
    blocks: int,
    ends: tuple[int, ...],
    text: str,
) -> None:
    """Register a torchvision-layout architecture whose weights the user supplies
    (``train.weights_path``, loaded strictly after :func:`_torchvision_keys`)."""
    register_teacher(
        TeacherSpec(
            name=name,
            build_network=build,
            convert_state_dict=_torchvision_keys,
            split_network=split,
            normalisation=IMAGENET_MEAN_STD,
            feature_dim=feature_dim,
            num_blocks=blocks,
            bundled_weights=None,
            description=f"{text}; bring torchvision-layout weights (train.weights_path).",
            stage_ends=ends,
        )
    )
