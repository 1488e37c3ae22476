"""Tensors and augmentation for training: MONAI array transforms over the processed images.

Images leave the processed dataset as uint8 ``(S, S)`` and reach the model as float32
``(1, S, S)`` in [0, 1] pixel space; the model applies its teacher's normalisation itself
(see ``tasks.model.student``), so nothing here normalises, and nothing is normalised twice.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    ScaleIntensityRange,
    ToTensor,
)
from torch.utils.data import Dataset

from tasks.config import AugmentParams


def to_tensor_transform() -> Compose:
    """uint8 ``(S, S)`` → float32 ``(1, S, S)`` in [0, 1]; used for evaluation and serving."""
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            ToTensor(dtype=torch.float32, track_meta=False),
        ]
    )


def train_transform(config: AugmentParams, image_size: int) -> Compose:
    """:func:`to_tensor_transform` followed by random flips, affine jitter, contrast and noise.

    The augmentations are mild on purpose: radiographs come in a standard pose, and a subtle
    finding must survive them.
    """
    transforms = list(to_tensor_transform().transforms)
    if config.flip:
        transforms.append(RandFlip(prob=0.5, spatial_axis=1))
    if config.rotate_degrees or config.scale or config.translate:
        transforms.append(
            RandAffine(
                prob=0.7,
                rotate_range=np.deg2rad(config.rotate_degrees),
                scale_range=config.scale,
                translate_range=config.translate * image_size,  # in pixels
                padding_mode="border",
            )
        )
    if config.contrast_gamma:
        transforms.append(
            RandAdjustContrast(
                prob=0.5, gamma=(1 - config.contrast_gamma, 1 + config.contrast_gamma)
            )
        )
    if config.noise_std:
        transforms.append(RandGaussianNoise(prob=0.3, std=config.noise_std))
    return Compose(transforms)


# Kept rather than monai.data.ArrayDataset: that one reseeds the transform on every item from
# its own RandomState, overriding the per-epoch set_random_state that makes a resumed epoch
# replay exactly (tasks/training/loop.py), and does not clamp jittered pixels to [0, 1].
class ImageDataset(Dataset):
    """``(image, label)`` pairs from uint8 arrays through a MONAI transform.

    Args:
        images: uint8 ``(N, S, S)`` (a memory map is fine: only one row is read per item).
        labels: int ``(N,)``.
        transform: maps a uint8 ``(S, S)`` array to a float ``(1, S, S)`` tensor.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Compose) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(np.asarray(self.images[index], dtype=np.float32))
        if isinstance(image, MetaTensor):  # MONAI's tensor subclass: plain tensors collate faster
            image = image.as_tensor()
        # Intensity jitter may leave [0, 1]; the model's input contract is pixel space.
        return image.float().clamp_(0.0, 1.0), int(self.labels[index])
