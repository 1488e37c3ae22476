"""The control: uniform noise at the same budget. A drop here is fragility, not attack.

Registered as ``noise_acc``: the student's accuracy on noisy images.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from tasks.robustness.attacks._base import AttackContext, Measure
from tasks.robustness.attacks._common import (
    AttackOutcome,
    Device,
    Images,
    Labels,
    checked,
    project,
    scored,
)
from tasks.robustness.result import Rate


def noise_attack(
    model: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: Device = "cpu",
) -> AttackOutcome:
    """i.i.d. uniform noise in [-eps, eps] per pixel, clipped to [0, 1]."""
    eps, clean, y = checked(images, labels, eps)
    rng = np.random.default_rng(seed)
    noisy = clean + rng.uniform(-eps, eps, size=clean.shape).astype(np.float32)
    return scored(model, eps, project(noisy, clean, eps), y, batch_size, device)


class Noise:
    """:func:`noise_attack` on the student, seeded per budget."""

    name = "noise"
    measures = (Measure("noise_acc", "uniform noise accuracy", "accuracy"),)
    gates = ()

    def run(self, context: AttackContext, eps: float) -> dict[str, Rate]:
        outcome = noise_attack(
            context.student,
            context.clean,
            context.labels,
            eps,
            seed=context.seed_for(self.name, eps),
            **context.common,
        )
        return {"noise_acc": Rate(outcome.accuracy, len(context.labels))}


ATTACK = Noise()
