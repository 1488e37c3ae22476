"""``train.augment`` on whole batches as tensors: the training loop's augmentation.

The same transforms, probabilities and parameter ranges as the per-image MONAI chain of
:func:`tasks.model.transforms.train_transform` (kept as the reference: the benchmark
``benchmarks/train_speed.py`` runs both, and a test compares their distributions), drawn per
image but applied to a ``(B, C, S, S)`` batch at once: one ``grid_sample`` for every affine
jitter of the batch instead of a MONAI ``MetaTensor`` pipeline per image, on the device the
batch is on. In order, each image independently:

- flip left-right with probability 0.5 (``flip``);
- with probability 0.7 an affine jitter (``rotate_degrees``, ``scale``, ``translate``): angle
  ``U(-r, r)``, a scale factor ``1 + U(-s, s)`` and a shift ``U(-t, t) * S`` pixels along the
  rows (vertical) axis only, the output pixel ``p`` (centred) sampled at ``R (diag(scale) p +
  shift)`` (MONAI's ``AffineGrid`` order), bilinear, border padding. Rows only because that
  is what the MONAI chain does with one number per range (``RandAffine`` reads a float
  ``scale_range`` or ``translate_range`` as the first spatial axis's alone; measured: 0.0175
  and 0.0278 mean absolute pixel change, which both axes would double);
- with probability 0.5 a gamma ``U(1 - g, 1 + g)`` between the image's own minimum and
  maximum (``contrast_gamma``, MONAI's ``AdjustContrast``);
- with probability 0.3 Gaussian noise of standard deviation ``U(0, noise_std)``;
- colour (C = 3) only, with probability 0.5: :class:`tasks.model.transforms.RandColourJitter`'s
  brightness, saturation and channel gains;

then clamped to [0, 1] (the model's input contract). The draws come from one seeded
``torch.Generator`` (:meth:`BatchAugment.seed`, called by the loop with the epoch's seed), so
a resumed epoch replays exactly and the result does not depend on DataLoader workers.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from tasks.config import AugmentParams
from tasks.data.preprocess import LUMA_WEIGHTS

FLIP_P, AFFINE_P, CONTRAST_P, NOISE_P, COLOUR_P = 0.5, 0.7, 0.5, 0.3, 0.5
CONTRAST_EPSILON = 1e-7  # MONAI's AdjustContrast: keeps a flat image finite


class BatchAugment:
    """Random ``train.augment`` transforms of float ``(B, C, S, S)`` batches in [0, 1].

    Args:
        config: the ``train.augment`` settings.
        image_size: S, the side the ``translate`` fraction is of.
        channels: 1 (gray: the colour jitter is off) or 3.
    """

    def __init__(self, config: AugmentParams, image_size: int, channels: int = 1) -> None:
        self.config = config
        self.image_size = image_size
        self.colour = channels == 3 and bool(config.colour_jitter)
        self.generator = torch.Generator().manual_seed(0)

    @property
    def active(self) -> bool:
        """Whether any transform is on (all off: batches pass through unchanged)."""
        c = self.config
        return bool(
            c.flip or c.rotate_degrees or c.scale or c.translate or c.contrast_gamma
            or c.noise_std or self.colour
        )  # fmt: skip

    def seed(self, seed: int) -> None:
        """Restart the draws from ``seed`` (the loop's per-epoch seed)."""
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented copy of float ``(B, C, S, S)`` ``images``, same shape, device and dtype."""
        c = self.config
        x = images
        if c.flip:
            x = torch.where(self._chosen(FLIP_P, x), x.flip(-1), x)
        if c.rotate_degrees or c.scale or c.translate:
            x = self._affine(x)
        if c.contrast_gamma:
            x = self._contrast(x)
        if c.noise_std:
            x = self._noise(x)
        if self.colour:
            x = self._colour(x)
        return x.clamp(0.0, 1.0)

    def _uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        """``U(low, high)`` draws of ``shape`` from the generator (on the CPU)."""
        return low + (high - low) * torch.rand(shape, generator=self.generator)

    def _chosen(self, p: float, x: torch.Tensor) -> torch.Tensor:
        """Which images of ``x`` a transform of probability ``p`` applies to, ``(B, 1, 1, 1)``
        bool on ``x``'s device."""
        return (torch.rand(len(x), generator=self.generator) < p).view(-1, 1, 1, 1).to(x.device)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation, per-axis scale and shift of the chosen images, resampled in one pass."""
        c, n, side = self.config, len(x), self.image_size
        chosen = self._chosen(AFFINE_P, x).view(-1)
        angle = self._uniform(-1, 1, n) * math.radians(c.rotate_degrees)
        # (rows, columns): the columns keep scale 1 and shift 0 (see the module docstring)
        scale = torch.ones(n, 2)
        scale[:, 0] += self._uniform(-1, 1, n) * c.scale
        shift = torch.zeros(n, 2)
        shift[:, 0] = self._uniform(-1, 1, n) * c.translate * side  # pixels
        # grid_sample's grid is (x = column, y = row) in [-1, 1] with align_corners=True, so
        # the centred pixel coordinate p maps to p / half.
        half = (side - 1) / 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        theta = torch.zeros(n, 2, 3)
        # rows-columns order -> grid's (x, y) order: swap both axes of the matrix
        linear = rotation @ torch.diag_embed(scale)
        theta[:, :, :2] = linear.flip(-1).flip(-2)
        theta[:, :, 2] = (rotation @ shift.unsqueeze(-1)).squeeze(-1).flip(-1) / half
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        theta = torch.where(chosen.cpu().view(-1, 1, 1), theta, identity)
        grid = functional.affine_grid(theta.to(x), list(x.shape), align_corners=True)
        moved = functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return torch.where(chosen.view(-1, 1, 1, 1), moved, x)

    def _contrast(self, x: torch.Tensor) -> torch.Tensor:
        """Gamma between each chosen image's own minimum and maximum."""
        g = self.config.contrast_gamma
        chosen = self._chosen(CONTRAST_P, x)
        gamma = self._uniform(1 - g, 1 + g, len(x)).view(-1, 1, 1, 1).to(x)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - low
        adjusted = ((x - low) / (span + CONTRAST_EPSILON)).clamp_min(0).pow(gamma) * span + low
        return torch.where(chosen, adjusted, x)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian noise of a per-image standard deviation ``U(0, noise_std)``."""
        chosen = self._chosen(NOISE_P, x)
        std = self._uniform(0, self.config.noise_std, len(x)).view(-1, 1, 1, 1)
        noise = torch.randn(x.shape, generator=self.generator) * std
        return torch.where(chosen, x + noise.to(x), x)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, saturation and channel gains (``RandColourJitter``'s, per image)."""
        strength, n = float(self.config.colour_jitter), len(x)
        chosen = self._chosen(COLOUR_P, x)
        brightness = self._uniform(1 - strength, 1 + strength, n).view(-1, 1, 1, 1).to(x)
        saturation = self._uniform(1 - strength, 1 + strength, n).view(-1, 1, 1, 1).to(x)
        gains = self._uniform(1 - strength / 2, 1 + strength / 2, n, 3).view(-1, 3, 1, 1).to(x)
        weights = torch.as_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1).to(x)
        luma = (x * weights).sum(dim=1, keepdim=True)
        jittered = brightness * gains * (luma + saturation * (x - luma))
        return torch.where(chosen, jittered, x)
