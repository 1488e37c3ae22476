"""Tensors and augmentation for training: MONAI array transforms over the processed images.

Images leave the processed dataset as uint8 ``(S, S)`` (gray) or ``(3, S, S)`` (colour) and
reach the model as float32 ``(C, S, S)`` in [0, 1] pixel space; the model applies its teacher's normalisation itself
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
    RandomizableTransform,
    ScaleIntensityRange,
    ToTensor,
)
from torch.utils.data import Dataset

from tasks.config import AugmentParams
from tasks.data.preprocess import LUMA_WEIGHTS


def to_tensor_transform(channels: int = 1) -> Compose:
    """uint8 ``(S, S)`` (``channels`` 1) or ``(3, S, S)`` (3) → float32 ``(C, S, S)`` in
    [0, 1]; used for evaluation and serving."""
    # A colour image is stored channel first already.
    first = EnsureChannelFirst(channel_dim="no_channel" if channels == 1 else 0)
    return Compose(
        [
            first,
            ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            ToTensor(dtype=torch.float32, track_meta=False),
        ]
    )


def train_transform(config: AugmentParams, image_size: int, channels: int = 1) -> Compose:
    """:func:`to_tensor_transform` followed by random flips, affine jitter, contrast and noise,
    and for colour images (``channels`` 3) a colour jitter (:class:`RandColourJitter`).

    The augmentations are mild on purpose: radiographs come in a standard pose, and a subtle
    finding must survive them.
    """
    transforms = list(to_tensor_transform(channels).transforms)
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
    if channels == 3 and config.colour_jitter:  # off for gray: nothing to jitter
        transforms.append(RandColourJitter(prob=0.5, strength=config.colour_jitter))
    return Compose(transforms)


class RandColourJitter(RandomizableTransform):
    """Brightness, saturation and per-channel gain jitter of a ``(3, S, S)`` image in [0, 1].

    With probability ``prob``: brightness ``b`` and saturation ``s`` from ``[1 - strength,
    1 + strength]`` and a gain per channel from ``[1 - strength/2, 1 + strength/2]``;
    ``x' = b * gain * (luma + s * (x - luma))``. Seeded through MONAI's ``set_random_state``
    like the other transforms, so a resumed epoch replays exactly. Hue is moved only through
    the channel gains: a finding carried by hue must survive the jitter.
    """

    def __init__(self, prob: float, strength: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.strength = float(strength)
        self._factors = np.ones(5, dtype=np.float32)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        half = self.strength / 2
        brightness, saturation = self.R.uniform(1 - self.strength, 1 + self.strength, 2)
        gains = self.R.uniform(1 - half, 1 + half, 3)
        self._factors = np.array([brightness, saturation, *gains], dtype=np.float32)

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        brightness, saturation, *gains = (float(f) for f in self._factors)
        weights = torch.tensor(LUMA_WEIGHTS, dtype=image.dtype).view(3, 1, 1)
        luma = (image * weights).sum(dim=0, keepdim=True)
        gain = torch.tensor(gains, dtype=image.dtype).view(3, 1, 1)
        return brightness * gain * (luma + saturation * (image - luma))


# Kept rather than monai.data.ArrayDataset: that one reseeds the transform on every item from
# its own RandomState, overriding the per-epoch set_random_state that makes a resumed epoch
# replay exactly (tasks/training/loop.py), and does not clamp jittered pixels to [0, 1].
class ImageDataset(Dataset):
    """``(image, label)`` pairs from uint8 arrays through a MONAI transform.

    Args:
        images: uint8 ``(N, S, S)`` or ``(N, 3, S, S)`` (a memory map, or the ``Rows`` of one
            that training passes, is fine: only one row is read per item).
        labels: int ``(N,)``.
        transform: maps a uint8 ``(S, S)`` or ``(3, S, S)`` array to a float ``(C, S, S)``
            tensor.
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
