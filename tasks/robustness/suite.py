"""The budget sweep: every registered attack at every budget, one row per budget.

The attacks are the public modules of :mod:`tasks.robustness.attacks`, each declaring its
``ATTACK`` (:class:`~tasks.robustness.attacks._base.Attack`); nothing here names one. The
robustness stage calls :func:`evaluate_robustness` once per attacked model with the typed
``robustness`` section of ``params.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from torch import nn

from tasks.config import RobustnessParams
from tasks.data.dataset import ProcessedDataset
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.errors import MedtransferError
from tasks.plugins import import_plugins
from tasks.robustness.attacks._base import Attack, AttackContext, Gate, Measure
from tasks.robustness.attacks._common import (
    Device,
    Images,
    Labels,
    as_label_array,
    as_pixel_array,
    check_eps,
    check_step_fraction,
    predict,
)
from tasks.robustness.result import EpsilonRow, RobustnessResult, check_distinct_epsilons


@cache
def registered_attacks() -> tuple[Attack, ...]:
    """Every attack family's ``ATTACK``, in the order of its module's name."""
    return tuple(module.ATTACK for module in import_plugins("tasks.robustness.attacks"))


def all_measures() -> tuple[Measure, ...]:
    """The measures of every registered attack, in the order of the table and the plot."""
    return tuple(measure for attack in registered_attacks() for measure in attack.measures)


def all_gates() -> tuple[Gate, ...]:
    """The promotion gates every registered attack declares."""
    return tuple(gate for attack in registered_attacks() for gate in attack.gates)


def attack_subset(
    dataset: ProcessedDataset, max_samples: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset of the test split as float [0, 1] ``(N, 1, S, S)`` images and labels."""
    indices = dataset.indices("test")
    if max_samples is not None and len(indices) > max_samples:
        indices = np.sort(
            np.random.default_rng(seed).choice(indices, size=max_samples, replace=False)
        )
    images = uint8_to_model_pixels(dataset.images[indices])
    return images, dataset.labels[indices]


def _checked_inputs(
    images: Images, labels: Labels, epsilons: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The evaluation images as float pixels ``(N, C, H, W)``, their labels ``(N,)`` and the
    sorted, de-duplicated budgets; refuses an empty set of images or budgets."""
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
    if len(clean) == 0:
        raise MedtransferError("The robustness check needs at least one evaluation image.")
    budgets = sorted({check_eps(eps) for eps in epsilons})
    if not budgets:
        raise MedtransferError("The robustness check needs at least one budget (epsilons).")
    check_distinct_epsilons(budgets)
    return clean, y, budgets


def _budget_row(context: AttackContext, eps: float) -> EpsilonRow:
    """Every registered attack at one budget."""
    rates = {}
    for attack in registered_attacks():
        measured = attack.run(context, eps)
        rates.update({measure.name: measured[measure.name] for measure in attack.measures})
    return EpsilonRow(eps=eps, rates=rates)


def evaluate_robustness(
    student: nn.Module,
    teacher_features: nn.Module,
    images: Images,
    labels: Labels,
    settings: RobustnessParams,
    *,
    seed: int = 0,
    device: Device = "cpu",
    natural_images: np.ndarray | None = None,
    target_pool: tuple[np.ndarray, np.ndarray] | None = None,
    crafted: dict | None = None,
    on_budget: Callable[[EpsilonRow], None] | None = None,
) -> RobustnessResult:
    """Measure the student under every registered attack at every budget of ``settings``.

    Args:
        student: the classifier under test (pixel space in, logits out).
        teacher_features: the pristine public teacher's feature extractor; the transfer and
            universal attacks are crafted on it alone.
        images: float ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` class indices.
        settings: the ``robustness`` section: budgets (``epsilons``, budget 0 is the clean
            row), steps, batch size and each attack's own settings.
        seed: every random start, noise draw and target derives from it, per attack and budget.
        device: where the models run (they are moved there).
        natural_images: ``(M, C, H, W)`` natural crops for the universal perturbation
            (:func:`tasks.robustness.attacks.universal.natural_crops`); ``None`` skips it.
        target_pool: ``(images, labels)`` for mimicry targets; default: ``images``.
        crafted: share one dict between calls that attack several models on the same images
            with the same teacher: teacher-crafted perturbations are crafted only once.
        on_budget: told each budget's row as soon as its attacks are done (progress).

    Returns:
        A :class:`RobustnessResult` (no adversarial images are kept).
    """
    clean, y, budgets = _checked_inputs(images, labels, settings.epsilons)
    fraction = check_step_fraction(settings.pgd_step_fraction, settings.pgd_steps)
    clean_predictions = predict(student, clean, batch_size=settings.batch_size, device=device)
    context = AttackContext(
        student, teacher_features, clean, y, clean_predictions, settings, fraction, seed,
        device, target_pool, natural_images, crafted,
    )  # fmt: skip
    rows = []
    for eps in budgets:
        rows.append(_budget_row(context, eps))
        if on_budget is not None:
            on_budget(rows[-1])
    return RobustnessResult(
        clean_acc=float(np.mean(clean_predictions == y)),
        n_examples=len(clean),
        rows=tuple(rows),
        pgd_steps=settings.pgd_steps,
        pgd_step_size=fraction,
        seed=seed,
    )
