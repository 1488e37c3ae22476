"""The attack of an outsider with only the served API: ART's query-only Square attack
(Andriushchenko et al., 2020) on the student's class probabilities.

No gradient, no weights, no teacher: random square-shaped L-inf updates, each kept when the
returned probabilities say it helped. The student is called only under ``torch.no_grad`` on
finished images, as the service would be. Registered as ``square_acc`` and ``square_success``
(the share of its clean-correct answers flipped) on the first
``robustness.square_max_samples`` attacked images, with at most ``robustness.square_queries``
iterations (one query per image each); 0 samples turns it off. Gate:
``gates.max_square_success`` at ``gates.square_eps_255``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.model.label_kind import SINGLE_LABEL
from tasks.robustness.attacks._base import AttackContext, Gate, Measure
from tasks.robustness.attacks._common import (
    AttackOutcome,
    Device,
    Images,
    Labels,
    checked,
    model_outputs,
    nothing_to_do,
    numpy_global_seed,
    project,
    scored,
)
from tasks.robustness.result import NOT_MEASURED, Rate


def _served(model: nn.Module, batch_size: int, device: Device):
    """The service as the attacker sees it: images ``(B, C, H, W)`` in, class probabilities
    ``(B, n_classes)`` out, no gradient."""

    def probabilities(images: np.ndarray) -> np.ndarray:
        logits = model_outputs(model, images, batch_size=batch_size, device=device)
        return SINGLE_LABEL.probabilities(torch.from_numpy(logits)).numpy()

    return probabilities


def square_attack(
    model: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    queries: int = 50,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
) -> AttackOutcome:
    """L-inf Square attack against the true labels, querying ``model``'s probabilities only.

    ``queries``: ART's iterations (each queries every image not yet fooled once); ``eps == 0``
    returns the clean images.
    """
    eps, clean, y = checked(images, labels, eps)
    if nothing_to_do(eps, clean):
        return scored(model, eps, clean.copy(), y, batch_size, device)
    # Deferred: ART imports scikit-learn, scipy and more.
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    served = _served(model, batch_size, device)
    api = BlackBoxClassifierNeuralNetwork(
        served,
        input_shape=tuple(clean.shape[1:]),
        nb_classes=int(served(clean[:1]).shape[1]),
        channels_first=True,
        clip_values=(0.0, 1.0),
    )
    with numpy_global_seed(seed):  # Square draws its squares from numpy's global generator
        attack = SquareAttack(
            api, norm=np.inf, eps=eps, max_iter=queries, batch_size=batch_size, verbose=False
        )
        adversarial = attack.generate(x=clean, y=y)
    return scored(model, eps, project(adversarial, clean, eps), y, batch_size, device)


class Square:
    """:func:`square_attack` on the first ``square_max_samples`` images of the sweep."""

    name = "square"
    measures = (
        Measure("square_acc", "query-only (Square) attack accuracy", "accuracy"),
        Measure("square_success", "query-only (Square) attack success rate", "success"),
    )
    gates = (Gate("max_square_success", "square_eps", ("square_success",)),)

    def run(self, context: AttackContext, eps: float) -> dict[str, Rate]:
        rows = slice(0, context.settings.square_max_samples)
        clean, labels = context.clean[rows], context.labels[rows]
        if len(clean) == 0:
            return {"square_acc": NOT_MEASURED, "square_success": NOT_MEASURED}
        outcome = square_attack(
            context.student, clean, labels, eps,
            queries=context.settings.square_queries, seed=context.seed_for(self.name, eps),
            **context.common,
        )  # fmt: skip
        correct = context.clean_correct[rows]
        flipped = int(np.sum(outcome.predictions[correct] != labels[correct]))
        return {
            "square_acc": Rate(outcome.accuracy, len(labels)),
            "square_success": Rate.of(flipped, int(correct.sum())),
        }


ATTACK = Square()
