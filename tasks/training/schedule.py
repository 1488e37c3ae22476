"""The plan of a fit: how many epochs it runs (``train.epochs``, cut by the step budget
``train.max_steps``), the image side each epoch trains at (progressive resizing,
``train.progressive_size``) and its per-step learning-rate schedule over them."""

from __future__ import annotations

import math

import torch
from monai.optimizers import WarmupCosineSchedule

from tasks.training.types import FitConfig


def planned_epochs(config: FitConfig, steps_per_epoch: int) -> int:
    """How many epochs this fit plans: ``train.epochs``, or fewer when ``train.max_steps``
    is reached first, the fewest whole epochs of ``steps_per_epoch`` optimizer steps that
    reach it. Why a step budget: what a fine-tune needs grows with its optimizer steps, not
    with passes over the data, so a set ten times larger reaches it in a tenth of the epochs
    while a small set (the demo's, BreastMNIST's) never meets it."""
    if config.max_steps is None:
        return config.epochs
    return max(1, min(config.epochs, math.ceil(config.max_steps / max(1, steps_per_epoch))))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, config: FitConfig, steps_per_epoch: int
) -> WarmupCosineSchedule:
    """MONAI's per-step schedule: linear warm-up over ``warmup_epochs`` from ``lr / warmup``
    (not from 0, which would waste the first of a fine-tune's few hundred steps), then cosine
    decay to 0 at the last planned step. A step budget compresses the whole schedule: the
    warm-up keeps its share of it (1 of 12 epochs stays a twelfth when 4 epochs are planned),
    so a budget of one epoch is not all warm-up."""
    epochs = planned_epochs(config, steps_per_epoch)
    warmup_epochs = config.warmup_epochs * epochs / config.epochs
    warmup = max(1, round(warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, epochs * steps_per_epoch)
    return WarmupCosineSchedule(optimizer, warmup, total, warmup_multiplier=1.0 / warmup)


def small_epochs(config: FitConfig, epochs: int) -> int:
    """How many of the ``epochs`` planned train on batches downsampled to
    ``train.progressive_size``: the first ``round(progressive_share * epochs)``, and never
    the last one (a student always ends trained at the side it is validated and served at);
    0 when progressive resizing is off."""
    if config.progressive_size is None:
        return 0
    return max(0, min(epochs - 1, round(config.progressive_share * epochs)))


def epoch_side(config: FitConfig, epoch: int, epochs: int, full_side: int) -> int:
    """The side (pixels) the 0-based ``epoch`` of ``epochs`` trains at, for images stored at
    ``full_side``: ``train.progressive_size`` during the first :func:`small_epochs` when it is
    smaller than ``full_side``, else ``full_side``. Why: a step at half the side costs about a
    third of the time (fast.ai's progressive resizing, EfficientNetV2's progressive learning),
    and what the early epochs learn (the head, coarse features) does not need the full
    resolution; the last epochs at ``full_side`` fit the student to the side it serves at."""
    small = config.progressive_size
    if small is not None and small < full_side and epoch < small_epochs(config, epochs):
        return small
    return full_side
