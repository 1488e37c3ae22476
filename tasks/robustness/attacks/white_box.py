"""White-box attacks on the student's own gradients, as an attacker holding the weights would:
FGSM and APGD-CE from the adversarial-robustness-toolbox (ART), and our PGD, the one that
adversarial training (:mod:`tasks.training.adversarial`) also runs.

Registered as one family reporting ``robust_acc_fgsm``, ``robust_acc_pgd`` and
``robust_acc_apgd``, the reported worst case (an image counts as robust at ``eps`` only if
APGD-CE, PGD and FGSM at every budget up to ``eps`` all failed on it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model.label_kind import SINGLE_LABEL
from tasks.robustness.attacks._base import AttackContext, Gate, Measure
from tasks.robustness.attacks._common import (
    AttackOutcome,
    Device,
    Images,
    Labels,
    batches,
    checked,
    default_step_size,
    nothing_to_do,
    numpy_global_seed,
    preserved_state,
    project,
    scored,
)
from tasks.robustness.result import Rate


def _count_classes(model: nn.Module, sample: np.ndarray, device: Device) -> int:
    with preserved_state(model), torch.no_grad():
        model.to(device)
        logits = model(torch.from_numpy(sample[:1]).to(device))
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise MedtransferError(
            "The attacked model must return logits of shape (B, n_classes >= 2), "
            f"got {tuple(logits.shape)}."
        )
    return int(logits.shape[1])


def _art_classifier(model: nn.Module, images: np.ndarray, device: Device):
    """Wrap ``model`` for ART: clip values (0, 1), no preprocessing (the model normalises)."""
    # Deferred: ART imports scikit-learn, scipy and more; adversarial training needs none.
    from art.estimators.classification import PyTorchClassifier

    torch_device = torch.device(device)
    # ART takes "cpu" or "gpu" and then uses the *current* CUDA device, so make ours current.
    device_type = "gpu" if torch_device.type == "cuda" else "cpu"
    nb_classes = _count_classes(model, images, torch_device)
    with torch.cuda.device(torch_device) if device_type == "gpu" else nullcontext():
        return PyTorchClassifier(
            model=model,
            # Summed, not averaged: a batch mean shrinks every gradient by 1/B, and confident
            # examples' gradients then underflow to exact zeros in float32, masking the attack.
            loss=SINGLE_LABEL.loss(reduction="sum"),
            input_shape=tuple(images.shape[1:]),
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            device_type=device_type,
        )


def fgsm_attack(
    model: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    batch_size: int = 32,
    device: Device = "cpu",
) -> AttackOutcome:
    """White-box FGSM (one signed-gradient step of size ``eps``) against the true labels.

    ``eps == 0`` returns the clean images without calling ART.
    """
    eps, clean, y = checked(images, labels, eps)
    if nothing_to_do(eps, clean):
        return scored(model, eps, clean.copy(), y, batch_size, device)
    # Deferred: ART is a heavy import (see _art_classifier).
    from art.attacks.evasion import FastGradientMethod

    with preserved_state(model):
        classifier = _art_classifier(model, clean, device)
        # eps_step is only read in ART's "minimal" mode, but must be positive all the same.
        attack = FastGradientMethod(
            classifier, norm=np.inf, eps=eps, eps_step=eps, targeted=False, batch_size=batch_size
        )
        adversarial = attack.generate(x=clean, y=y)
    return scored(model, eps, project(adversarial, clean, eps), y, batch_size, device)


def pgd_perturb(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> torch.Tensor:
    """L-inf PGD (Madry et al.) on one batch: the one implementation that both the evaluation
    (:func:`pgd_attack`) and adversarial training (:mod:`tasks.training.adversarial`) run.

    Args:
        images: ``(B, C, H, W)`` in [0, 1], on the model's device; labels: ``(B,)``.
        generator: seeds the uniform random start in the ball (a CPU generator); ``None``
            uses torch's global generator (training, seeded by ``train``'s seed).
        random_start: ``False`` starts at the clean images.

    Returns:
        The perturbed batch, detached, within ``eps`` of ``images`` and in [0, 1]. The model's
        mode is the caller's business; only the input gets gradients (no parameter's ``.grad``).

    The loss is summed over the batch, not averaged: a mean shrinks every gradient by 1/B and
    confident examples' gradients then underflow to exact zeros in float32, masking the attack.
    """
    start = torch.zeros(images.shape)
    if random_start:
        start.uniform_(-eps, eps, generator=generator)
    delta = start.to(images.device, images.dtype)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model((images + delta).clamp(0.0, 1.0))
        loss = SINGLE_LABEL.loss(reduction="sum")(logits.float(), labels)
        (gradient,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * gradient.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0.0, 1.0).detach()


def pgd_attack(
    model: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_init: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
) -> AttackOutcome:
    """White-box L-inf PGD against the true labels, with :func:`pgd_perturb` (the attack
    adversarial training uses), in eval mode.

    Args:
        step_size: pixel units per iteration; ``None`` is :func:`default_step_size`.
        random_init: start from a uniform point in the ball (seeded by ``seed``); ``False``
            starts at the clean image.

    ``eps == 0`` returns the clean images.
    """
    eps, clean, y = checked(images, labels, eps)
    if steps < 1:
        raise MedtransferError(f"PGD needs at least one step, got {steps}.")
    if nothing_to_do(eps, clean):
        return scored(model, eps, clean.copy(), y, batch_size, device)
    step = float(step_size) if step_size is not None else default_step_size(eps, steps)
    if not step > 0:
        raise MedtransferError(f"PGD step size must be positive, got {step_size!r}.")
    generator = torch.Generator().manual_seed(seed)
    adversarial = np.empty_like(clean)
    with preserved_state(model):
        model.to(device).eval()
        for batch in batches(len(clean), batch_size):
            x = torch.from_numpy(clean[batch]).to(device)
            target = torch.from_numpy(y[batch]).to(device)
            perturbed = pgd_perturb(model, x, target, eps, steps, step, generator, random_init)
            adversarial[batch] = perturbed.cpu().numpy()
    return scored(model, eps, project(adversarial, clean, eps), y, batch_size, device)


def apgd_attack(
    model: nn.Module,
    images: Images,
    labels: Labels,
    eps: float,
    *,
    steps: int = 20,
    restarts: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
) -> AttackOutcome:
    """White-box APGD-CE (Croce and Hein, 2020; ART's ``AutoProjectedGradientDescent``): PGD
    that adapts its step and keeps the best iterate, so it does not give up where a fixed-step
    PGD overshoots. The loss is the estimator's summed cross-entropy (APGD's CE objective).

    ``restarts`` random starts (each attacks only the images still correctly classified);
    ``eps == 0`` returns the clean images.
    """
    eps, clean, y = checked(images, labels, eps)
    if nothing_to_do(eps, clean):
        return scored(model, eps, clean.copy(), y, batch_size, device)
    # Deferred: ART is a heavy import (see _art_classifier).
    from art.attacks.evasion import AutoProjectedGradientDescent

    with preserved_state(model), numpy_global_seed(seed):
        classifier = _art_classifier(model, clean, device)
        attack = AutoProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=eps,
            eps_step=2 * eps,  # APGD's initial step (the paper's 2 * eps); it halves as needed
            max_iter=steps,
            targeted=False,
            nb_random_init=restarts,
            batch_size=batch_size,
            loss_type=None,  # the estimator's summed cross-entropy
            verbose=False,
        )
        adversarial = attack.generate(x=clean, y=y)
    return scored(model, eps, project(adversarial, clean, eps), y, batch_size, device)


def _survivors(
    context: AttackContext, line: str, attack: Callable[[np.ndarray, np.ndarray], AttackOutcome]
) -> np.ndarray:
    """Run ``attack(images, labels)`` on the images line ``line`` has not fooled at any budget
    so far, and drop those it fools; returns the updated mask ``(N,)``.

    An image fooled at a smaller budget is fooled at every larger one (that perturbation is
    allowed there too), so it is not attacked again: each white-box line can only fall with
    the budget, and once an undefended student is at 0, larger budgets cost nothing.
    """
    memo = context.state("white_box")
    robust = memo.setdefault(line, context.clean_correct.copy())
    rows = np.flatnonzero(robust)
    if len(rows):
        outcome = attack(context.clean[rows], context.labels[rows])
        robust[rows] = outcome.predictions == context.labels[rows]
    return robust


class WhiteBox:
    """FGSM, PGD and the worst case with APGD-CE, each over the images no smaller budget of it
    fooled. APGD-CE runs only on images that FGSM and PGD here, and every attack at smaller
    budgets, left correct: the others are already fooled within this budget."""

    name = "white_box"
    measures = (
        Measure("robust_acc_fgsm", "white-box FGSM robust accuracy", "accuracy"),
        Measure("robust_acc_pgd", "white-box PGD robust accuracy", "accuracy"),
        Measure("robust_acc_apgd", "white-box (APGD-CE) robust accuracy", "accuracy"),
    )
    gates = (Gate("min_robust_acc", "robust_acc_eps", ("robust_acc_apgd",)),)

    def run(self, context: AttackContext, eps: float) -> dict[str, Rate]:
        student, settings, common = context.student, context.settings, context.common
        fgsm = _survivors(context, "fgsm", lambda x, y: fgsm_attack(student, x, y, eps, **common))
        pgd_settings = {
            "steps": settings.pgd_steps,
            "step_size": context.step_fraction * eps,
            "seed": context.seed_for("pgd", eps),
        }
        pgd = _survivors(
            context, "pgd", lambda x, y: pgd_attack(student, x, y, eps, **pgd_settings, **common)
        )
        worst = context.state(self.name).setdefault("worst", context.clean_correct.copy())
        worst &= fgsm & pgd
        apgd_settings = {"steps": settings.apgd_steps, "seed": context.seed_for("apgd", eps)}
        worst = _survivors(
            context,
            "worst",
            lambda x, y: apgd_attack(student, x, y, eps, **apgd_settings, **common),
        )
        n = len(context.labels)
        return {
            "robust_acc_fgsm": Rate.of(int(fgsm.sum()), n),
            "robust_acc_pgd": Rate.of(int(pgd.sum()), n),
            "robust_acc_apgd": Rate.of(int(worst.sum()), n),
        }


ATTACK = WhiteBox()
