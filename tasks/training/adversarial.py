"""The mitigation: PGD adversarial training (Madry et al.), as a hook of the training loop.

Each training batch is replaced by its worst case within an L-inf ball of ``eps`` in pixel
space, found by a few signed-gradient steps from a random start: the same PGD
(:func:`tasks.robustness.attacks.white_box.pgd_perturb`) that the robustness check measures with. The student then learns on
perturbed images, trading some clean accuracy for robustness; the robustness report shows
that trade-off when the plain and the PGD-trained student are compared
(``train.compare=[partial,partial+pgd]``).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.robustness.attacks.white_box import pgd_perturb
from tasks.training.loop import Perturb

ADVERSARIAL_SUFFIX = "+pgd"


def split_variant(name: str) -> tuple[str, bool]:
    """``"partial+pgd"`` → ``("partial", True)``; ``"partial"`` → ``("partial", False)``."""
    if name.endswith(ADVERSARIAL_SUFFIX):
        return name.removesuffix(ADVERSARIAL_SUFFIX), True
    return name, False


def pgd_perturbation(eps: float, steps: int, step_fraction: float = 2.5) -> Perturb:
    """A training-loop hook returning PGD-perturbed copies of a batch.

    Args:
        eps: L-inf budget in pixel units ([0, 1] scale).
        steps: signed-gradient steps per batch.
        step_fraction: total step length over all steps as a multiple of ``eps`` (2.5, as in
            Madry et al., lets the search reach the ball's surface from any start).

    Returns:
        ``perturb(model, images, labels) -> images`` with values in [0, 1].
    """
    step = step_fraction * eps / max(steps, 1)

    def perturb(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Attack passes in eval mode: they must not move BatchNorm statistics or dropout masks.
        was_training = model.training
        model.eval()
        try:
            return pgd_perturb(model, images, labels, eps, steps, step)
        finally:
            model.train(was_training)

    return perturb
