"""The teacher-transfer attacks: perturbations crafted on the public teacher's feature extractor
alone, then shown to the student.

Two modes, both our own PGD-style loops (mimicry through ART's ``FeatureAdversariesPyTorch``)
that only ever call the teacher: ``untargeted`` pushes the teacher's features away from the
clean ones; ``mimicry`` pulls them onto another class's. The student sees the finished
perturbations only, under ``torch.no_grad``. Registered as one family reporting, per mode, the
student's accuracy and the success rate (the share of its clean-correct answers flipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.robustness.attacks._base import AttackContext, Gate, Measure
from tasks.robustness.attacks._common import (
    AttackOutcome,
    Device,
    Images,
    Labels,
    as_label_array,
    as_pixel_array,
    batches,
    check_eps,
    checked,
    default_step_size,
    nothing_to_do,
    predict,
    preserved_state,
    project,
    scored,
)
from tasks.robustness.result import Rate

TransferMode = Literal["untargeted", "mimicry"]


def _features(extractor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return extractor(x).flatten(start_dim=1)


def _feature_pgd(
    extractor: nn.Module,
    clean: np.ndarray,
    reference: Callable[[slice, torch.Tensor], torch.Tensor],
    direction: float,
    eps: float,
    steps: int,
    step_size: float,
    batch_size: int,
    seed: int,
    device: Device,
) -> np.ndarray:
    """Signed-gradient steps on ``direction * ||f(x + d) - reference||^2``, projected to the ball.

    The squared distance has the same signed gradient as the distance itself but no
    singularity at zero. The random start (uniform in half the ball) makes the untargeted
    objective's gradient non-zero: at ``d = 0`` it is exactly zero.
    Gradients are taken with ``torch.autograd.grad`` with respect to the images only, so no
    parameter of the extractor (or of anything sharing its modules) accumulates ``.grad``.
    """
    generator = torch.Generator().manual_seed(seed)
    adversarial = np.empty_like(clean)
    with preserved_state(extractor):
        extractor.to(device)
        for batch in batches(len(clean), batch_size):
            x = torch.from_numpy(clean[batch]).to(device)
            with torch.no_grad():
                target = reference(batch, x)
            start = (torch.rand(x.shape, generator=generator) * 2 - 1) * (eps / 2)
            x_adv = (x + start.to(device)).clamp(0.0, 1.0)
            for _ in range(steps):
                x_adv = x_adv.detach().requires_grad_(True)
                loss = (_features(extractor, x_adv) - target).pow(2).sum()
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    x_adv = x_adv + direction * step_size * grad.sign()
                    x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
            adversarial[batch] = x_adv.detach().cpu().numpy()
    return project(adversarial, clean, eps)


def craft_feature_attack(
    teacher_features: nn.Module,
    images: Images,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
) -> np.ndarray:
    """Untargeted teacher-transfer perturbation: push the teacher's features away from the clean
    ones, maximising ``||f(x + d) - f(x)||_2`` with ``||d||_inf <= eps``.

    Returns:
        float32 ``(N, C, H, W)`` perturbed images in [0, 1]; the clean images when ``eps == 0``.
    """
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    if nothing_to_do(eps, clean):
        return clean.copy()
    step = float(step_size) if step_size is not None else default_step_size(eps, steps)
    return _feature_pgd(
        teacher_features,
        clean,
        lambda _batch, x: _features(teacher_features, x),
        +1.0,
        eps,
        steps,
        step,
        batch_size,
        seed,
        device,
    )


def craft_feature_mimicry(
    teacher_features: nn.Module,
    images: Images,
    target_images: Images,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
) -> np.ndarray:
    """Targeted teacher-transfer perturbation (feature mimicry): make each image's teacher
    features resemble those of its target, minimising ``||f(x_i + d_i) - f(t_i)||_2``, with
    ART's ``FeatureAdversariesPyTorch`` (Sabour et al., 2016) in its PGD form from the clean
    image.

    Args:
        target_images: one target per image, same shape as ``images`` (see
            :func:`choose_mimicry_targets`).
    """
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    targets = as_pixel_array(target_images)
    if targets.shape != clean.shape:
        raise MedtransferError(
            f"Need one mimicry target per image: images {clean.shape}, targets {targets.shape}."
        )
    if nothing_to_do(eps, clean):
        return clean.copy()
    step = float(step_size) if step_size is not None else default_step_size(eps, steps)
    # Deferred: ART imports scikit-learn, scipy and more.
    from art.attacks.evasion import FeatureAdversariesPyTorch

    head = _FeatureOutput(teacher_features)
    with preserved_state(teacher_features), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attack = FeatureAdversariesPyTorch(
            _feature_estimator(head, clean, device),
            delta=eps,
            layer="features",
            max_iter=steps,
            step_size=step,
            batch_size=batch_size,
            random_start=False,  # towards a target the gradient at the clean image is not zero
            verbose=False,
        )
        adversarial = attack.generate(x=clean, y=targets)
    return project(np.asarray(adversarial, dtype=np.float32), clean, eps)


def _feature_estimator(head: nn.Module, clean: np.ndarray, device: Device):
    """``head`` wrapped as the ART estimator the feature attack needs."""
    # Deferred: ART imports scikit-learn, scipy and more.
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=head,
        loss=nn.MSELoss(),  # unused by the attack, required by the estimator
        input_shape=tuple(clean.shape[1:]),
        nb_classes=max(2, int(head(torch.from_numpy(clean[:1])).shape[1])),
        clip_values=(0.0, 1.0),
        device_type="gpu" if torch.device(device).type == "cuda" else "cpu",
    )


class _FeatureOutput(nn.Module):
    """The teacher's flattened features behind a fresh named layer, ``features``: ART's
    ``get_activations`` leaves a forward hook on the layer it reads, so it reads this
    throw-away one instead of a module of the shared teacher."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.extractor(x).flatten(start_dim=1))


def choose_mimicry_targets(labels: np.ndarray, pool_labels: np.ndarray, seed: int) -> np.ndarray:
    """For each label, the index of a pool example of a different class, chosen by ``seed``.

    Returns:
        int64 ``(N,)`` indices into the pool.

    Raises:
        MedtransferError: some label has no example of another class in the pool.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        candidates = np.flatnonzero(pool_labels != cls)
        if len(candidates) == 0:
            raise MedtransferError(
                f"Feature mimicry needs an example of another class than {cls} in the target pool; "
                "the pool holds a single class."
            )
        rows = np.flatnonzero(labels == cls)
        chosen[rows] = rng.choice(candidates, size=len(rows), replace=True)
    return chosen


@dataclass(frozen=True)
class TransferOutcome(AttackOutcome):
    """A teacher-transfer attack evaluated on the student.

    Attributes:
        success_rate: among the examples the student classified correctly on clean input, the
            fraction it misclassifies after the perturbation; NaN if it got none right.
        clean_correct: how many that was (the success rate's denominator).
    """

    success_rate: float = math.nan
    clean_correct: int = 0


def teacher_transfer_attack(
    student: nn.Module,
    teacher_features: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    mode: TransferMode = "untargeted",
    target_pool: tuple[Images, np.ndarray] | None = None,
    steps: int = 10,
    step_size: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
    clean_predictions: np.ndarray | None = None,
    crafted: dict | None = None,
) -> TransferOutcome:
    """Craft perturbations on the teacher's feature extractor only, then score them on the student.

    The student is never part of the crafting: it is called only by :func:`predict`, under
    ``torch.no_grad``, on finished perturbed images.

    Args:
        mode: ``untargeted`` (:func:`craft_feature_attack`) or ``mimicry``
            (:func:`craft_feature_mimicry`, targets from :func:`choose_mimicry_targets`).
        target_pool: ``(images, labels)`` to draw mimicry targets from; default: the evaluated
            images themselves.
        clean_predictions: the student's predictions on the clean images, if already known.
        crafted: a dict shared by calls on the same images, teacher and settings: perturbations
            crafted once are reused for every student scored (they do not depend on it).
    """
    eps, clean, y = checked(images, labels, eps)
    key = (mode, eps, steps, step_size, seed, len(clean))
    if crafted is not None and key in crafted:
        adversarial = crafted[key]
    else:
        craft = {"steps": steps, "step_size": step_size, "batch_size": batch_size, "seed": seed}
        adversarial = _craft_on_teacher(
            teacher_features, clean, y, eps, mode, target_pool, {**craft, "device": device}
        )
    if crafted is not None:
        crafted[key] = adversarial
    if clean_predictions is None:
        clean_predictions = predict(student, clean, batch_size=batch_size, device=device)
    base = scored(student, eps, adversarial, y, batch_size, device)
    correct = clean_predictions == y
    n_correct = int(correct.sum())
    success = float(np.mean(base.predictions[correct] != y[correct])) if n_correct else math.nan
    return TransferOutcome(
        eps=eps,
        adversarial=adversarial,
        predictions=base.predictions,
        accuracy=base.accuracy,
        success_rate=success,
        clean_correct=n_correct,
    )


def _craft_on_teacher(
    teacher_features: nn.Module,
    clean: np.ndarray,
    labels: np.ndarray,
    eps: float,
    mode: TransferMode,
    target_pool: tuple[Images, np.ndarray] | None,
    settings: dict,
) -> np.ndarray:
    """The teacher-transfer perturbed images ``(N, C, H, W)`` of ``mode``, crafted on the
    teacher alone; ``settings``: steps, step_size, batch_size, seed and device."""
    if mode == "untargeted":
        return craft_feature_attack(teacher_features, clean, eps, **settings)
    if mode == "mimicry":
        pool_images, pool_labels = (clean, labels) if target_pool is None else target_pool
        pool = as_pixel_array(pool_images)
        pool_y = as_label_array(pool_labels, len(pool))
        targets = pool[choose_mimicry_targets(labels, pool_y, settings["seed"])]
        return craft_feature_mimicry(teacher_features, clean, targets, eps, **settings)
    raise MedtransferError(
        f"Teacher-transfer mode must be 'untargeted' or 'mimicry', not {mode!r}."
    )


class TeacherTransfer:
    """Both teacher-transfer modes at one budget, crafted once per budget for every model
    attacked on the same images (``context.crafted``)."""

    name = "teacher_transfer"
    # measure prefix of each mode
    modes: tuple[tuple[TransferMode, str], ...] = (
        ("untargeted", "teacher_transfer"),
        ("mimicry", "teacher_mimicry"),
    )
    measures = (
        Measure("teacher_transfer_acc", "teacher transfer (untargeted) accuracy", "accuracy"),
        Measure(
            "teacher_transfer_success",
            "teacher-transfer (untargeted) attack success rate",
            "success",
        ),
        Measure("teacher_mimicry_acc", "teacher transfer (mimicry) accuracy", "accuracy"),
        Measure(
            "teacher_mimicry_success", "teacher-transfer (mimicry) attack success rate", "success"
        ),
    )
    gates = (
        Gate(
            "max_teacher_transfer_success",
            "teacher_transfer_eps",
            ("teacher_transfer_success", "teacher_mimicry_success"),
        ),
    )

    def run(self, context: AttackContext, eps: float) -> dict[str, Rate]:
        rates: dict[str, Rate] = {}
        n = len(context.labels)
        for mode, prefix in self.modes:
            outcome = teacher_transfer_attack(
                context.student,
                context.teacher_features,
                context.clean,
                context.labels,
                eps,
                mode=mode,
                target_pool=context.target_pool,
                steps=context.settings.pgd_steps,
                step_size=context.step_fraction * eps,
                seed=context.seed_for(prefix, eps),
                clean_predictions=context.clean_predictions,
                crafted=context.crafted,
                **context.common,
            )
            rates[f"{prefix}_acc"] = Rate(outcome.accuracy, n)
            rates[f"{prefix}_success"] = Rate(outcome.success_rate, outcome.clean_correct)
        return rates


ATTACK = TeacherTransfer()
