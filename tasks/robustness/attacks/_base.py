"""The one shape of an attack: its name, the measures it reports, its gates, ``run(context, eps)``.

The sweep (:mod:`tasks.robustness.suite`) builds one :class:`AttackContext` per attacked model
and calls every registered attack's ``run`` at each budget, ascending, budget 0 first; the
result rows, the metric names, the plot, the progress lines and the gates all read the
attacks' :class:`Measure` and :class:`Gate` declarations, so none of them names an attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from torch import nn

from tasks.config import RobustnessParams
from tasks.robustness.attacks._common import Device, derive_seed
from tasks.robustness.result import Rate

# accuracy: a fraction of all images, the clean accuracy at budget 0 (plotted);
# success: a fraction of the images the model got right on clean input;
# change: a fraction of all images whose predicted class changed.
MeasureKind = Literal["accuracy", "success", "change"]


@dataclass(frozen=True)
class Measure:
    """One number an attack reports at every budget.

    Attributes:
        name: the metric name before ``_eps_<budget>`` (``robust_acc_pgd``).
        label: how gate sentences, the plot's legend and progress lines call it.
        kind: see :data:`MeasureKind`.
    """

    name: str
    label: str
    kind: MeasureKind


@dataclass(frozen=True)
class Gate:
    """A promotion gate on an attack's measures at one budget (thresholds in ``params.yaml``).

    Attributes:
        threshold: the gate's key (``max_teacher_transfer_success``); ``min_*`` gates hold on
            the 95% interval's lower bound, ``max_*`` gates on its upper bound.
        budget: the key of the budget it applies to (``teacher_transfer_eps``, pixel units).
        measures: the measures it bounds; the worst of them (by the bound that decides)
            decides. The first must have been measured at the budget; the others may be absent.
        default_eps: the budget the per-strategy table reads when ``budget`` is unset.
    """

    threshold: str
    budget: str
    measures: tuple[str, ...]
    default_eps: float = 1 / 255


@dataclass
class AttackContext:
    """What every attack at every budget of one attacked model shares.

    Attributes:
        student: the model under attack (pixel space in, logits out).
        teacher_features: the pristine public teacher's feature extractor.
        clean: float ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``; clean_predictions: the
            student's classes on ``clean`` ``(N,)``.
        settings: the ``robustness`` section of ``params.yaml``.
        step_fraction: PGD's step as a fraction of each budget (resolved from ``settings``).
        seed: the user seed every attack's seeds derive from (:meth:`seed_for`).
        device: where the models run.
        target_pool: ``(images, labels)`` for mimicry targets (``None``: ``clean``).
        natural_images: ``(M, C, H, W)`` natural crops for the universal perturbation, or None.
        crafted: shared between the models attacked on the same images: what an attack
            crafts on the teacher alone, crafted once.
        memo: per attack name, what it keeps from one budget to the next of this model.
    """

    student: nn.Module
    teacher_features: nn.Module
    clean: np.ndarray
    labels: np.ndarray
    clean_predictions: np.ndarray
    settings: RobustnessParams
    step_fraction: float
    seed: int
    device: Device = "cpu"
    target_pool: tuple[np.ndarray, np.ndarray] | None = None
    natural_images: np.ndarray | None = None
    crafted: dict | None = None
    memo: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def common(self) -> dict[str, Any]:
        """``batch_size`` and ``device``, as every attack function takes them."""
        return {"batch_size": self.settings.batch_size, "device": self.device}

    @property
    def clean_correct(self) -> np.ndarray:
        """Boolean ``(N,)``: the images the student classifies correctly unperturbed."""
        return self.clean_predictions == self.labels

    def seed_for(self, name: str, eps: float) -> int:
        """The seed of attack (or sub-attack) ``name`` at ``eps`` (:func:`derive_seed`)."""
        return derive_seed(self.seed, name, eps)

    def state(self, name: str) -> dict[str, Any]:
        """Attack ``name``'s memo for this model (empty at its first budget)."""
        return self.memo.setdefault(name, {})


class Attack(Protocol):
    """An attack family registered with the sweep (a module's ``ATTACK``).

    ``name`` names it in seeds and logs; ``measures`` are the numbers ``run`` returns, in
    the order of the table and the plot; ``gates`` the promotion gates on them (may be empty).
    ``run(context, eps)`` returns ``{measure name: Rate}`` for every measure at ``eps``; at
    ``eps == 0`` it perturbs nothing (accuracies are the clean accuracy, rates 0).
    """

    name: str
    measures: tuple[Measure, ...]
    gates: tuple[Gate, ...]

    def run(self, context: AttackContext, eps: float) -> Mapping[str, Rate]: ...
