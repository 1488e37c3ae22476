"""The plan of a fit: how many epochs it runs (``train.epochs``, cut by the step budget
``train.max_steps``) and its per-step learning-rate schedule over them."""

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
