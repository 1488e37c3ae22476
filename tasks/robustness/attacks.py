"""Adversarial attacks on a student, and attacks crafted on its public teacher alone.

Every model here is a ``torch.nn.Module`` taking ``(B, C, H, W)`` float images in pixel space
[0, 1] (models normalise internally) and returning logits ``(B, n_classes)``; the teacher's
feature extractor maps the same images to features ``(B, D)``. Budgets ``eps`` are L-inf radii
in the same pixel units (``1/255`` is one grey level of an 8-bit image).

- White-box FGSM and PGD come from the adversarial-robustness-toolbox (ART); they use the
  student's gradients, as an attacker holding the weights would.
- The teacher-transfer attacks are our own PGD-style loops that only ever call the teacher's
  feature extractor; the student sees the finished perturbations, under ``torch.no_grad``.
- Uniform noise at the same budget is the control: a drop there is fragility, not attack.

:func:`evaluate_robustness` runs all of them over a list of budgets and returns a
:class:`~tasks.robustness.verdict.RobustnessResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model.predict import run_model
from tasks.robustness.verdict import EpsilonRow, RobustnessResult, check_distinct_epsilons

Images = np.ndarray | torch.Tensor
Device = str | torch.device
TransferMode = Literal["untargeted", "mimicry"]

# Images may come back from a float pipeline a hair outside [0, 1]; more than this is a bug.
_RANGE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------
# inputs and model state


def as_pixel_array(images: Images) -> np.ndarray:
    """Check images and return them as a float32 ``(N, C, H, W)`` numpy array in [0, 1].

    Raises:
        MedtransferError: wrong rank, non-finite values, or values outside [0, 1] (e.g. uint8
            0..255 images, or images already normalised for a network).
    """
    array = (
        images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    )
    if array.ndim != 4:
        raise MedtransferError(
            f"Attack inputs must be (N, C, H, W) images, got shape {tuple(array.shape)}."
        )
    array = array.astype(np.float32, copy=True)
    if array.size and not np.isfinite(array).all():
        raise MedtransferError("Attack inputs contain NaN or infinite pixel values.")
    if array.size and (array.min() < -_RANGE_TOLERANCE or array.max() > 1 + _RANGE_TOLERANCE):
        raise MedtransferError(
            "Attack inputs must be pixel values in [0, 1], got "
            f"[{array.min():.3g}, {array.max():.3g}]; scale uint8 images by 1/255 and leave "
            "normalisation to the model."
        )
    return np.clip(array, 0.0, 1.0)


def as_label_array(labels: np.ndarray | torch.Tensor | Sequence[int], n: int) -> np.ndarray:
    """Class indices as an int64 ``(n,)`` array."""
    array = (
        labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    )
    array = array.reshape(-1).astype(np.int64)
    if array.shape != (n,):
        raise MedtransferError(f"Expected {n} labels, got {array.shape[0]}.")
    return array


def check_eps(eps: float) -> float:
    """A budget as a plain Python float in [0, 1] (ART refuses numpy float32 budgets)."""
    value = float(eps)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise MedtransferError(f"Attack budget eps must be in [0, 1] (pixel units), got {eps!r}.")
    return value


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, its parameters frozen and its convolutions in
    channels_last memory format, then restore its modes, ``requires_grad`` flags, parameter
    gradients and tensors.

    Attacks must not update BatchNorm statistics. Attacks need gradients with respect to the
    images only: ART's ``loss_gradient`` calls ``loss.backward()``, which with trainable
    parameters also computes (and leaves in ``.grad``) every weight gradient, about a third of
    the cost of a PGD step. A caller that is mid-training gets its model back as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    params = [(param, param.requires_grad, param.grad) for param in model.parameters()]
    # Convolutions run in channels_last inside the block: forward and backward passes of the
    # EfficientNet-Lite teacher and student take 0.77x the time on a 2-core CPU (measured,
    # see benchmarks/results/robustness-stage.md); the original tensors come back after.
    layouts = [(t, t.data) for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    model.eval()
    for param, _, _ in params:
        param.requires_grad_(False)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for tensor, data in layouts:
            tensor.data = data
        for module, mode in modes:
            module.train(mode)
        for param, requires_grad, grad in params:
            param.requires_grad_(requires_grad)
            param.grad = grad


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise MedtransferError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def predict(
    model: nn.Module, images: Images, *, batch_size: int = 64, device: Device = "cpu"
) -> np.ndarray:
    """Predicted class indices ``(N,)`` of ``model`` on ``images``, without any gradient.

    This is the only way a student is evaluated on perturbed images in this module: under
    ``torch.no_grad`` on finished, detached tensors, so no gradient can flow through it.
    """
    array = as_pixel_array(images)
    with preserved_state(model):  # the one forward pass (tasks.model.predict), modes restored
        model.to(device)
        return run_model(model, array, output="classes", batch_size=batch_size, device=device)


def _derive_seed(seed: int, *keys: int) -> int:
    """An independent 31-bit seed for each (attack, budget) from the one user seed."""
    return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    # ART draws its random starts from numpy's global generator; seed it for the attack only.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _project(adversarial: np.ndarray, clean: np.ndarray, eps: float) -> np.ndarray:
    """Clip into the L-inf ball around ``clean`` and into [0, 1].

    ART's float32 arithmetic can overshoot eps by an ulp; this makes "within eps" hold to
    float32 precision whatever produced ``adversarial``.
    """
    return np.clip(np.clip(adversarial, clean - eps, clean + eps), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# white-box attacks (ART)


@dataclass(frozen=True)
class AttackOutcome:
    """One attack at one budget.

    Attributes:
        eps: the L-inf budget.
        adversarial: the perturbed images, float32 ``(N, C, H, W)`` in [0, 1], within ``eps``
            of the inputs.
        predictions: the attacked model's classes on them ``(N,)``.
        accuracy: fraction of ``predictions`` equal to the true labels.
    """

    eps: float
    adversarial: np.ndarray
    predictions: np.ndarray
    accuracy: float


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
            loss=nn.CrossEntropyLoss(reduction="sum"),
            input_shape=tuple(images.shape[1:]),
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            device_type=device_type,
        )


def _outcome(
    model: nn.Module,
    eps: float,
    adversarial: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: Device,
) -> AttackOutcome:
    predictions = predict(model, adversarial, batch_size=batch_size, device=device)
    accuracy = float(np.mean(predictions == labels)) if len(labels) else math.nan
    return AttackOutcome(
        eps=eps, adversarial=adversarial, predictions=predictions, accuracy=accuracy
    )


def fgsm_attack(
    model: nn.Module,
    images: Images,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    eps: float,
    *,
    batch_size: int = 32,
    device: Device = "cpu",
) -> AttackOutcome:
    """White-box FGSM (one signed-gradient step of size ``eps``) against the true labels.

    ``eps == 0`` returns the clean images without calling ART.
    """
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
    if eps == 0.0 or len(clean) == 0:
        return _outcome(model, eps, clean.copy(), y, batch_size, device)
    from art.attacks.evasion import FastGradientMethod

    with preserved_state(model):
        classifier = _art_classifier(model, clean, device)
        # eps_step is only read in ART's "minimal" mode, but must be positive all the same.
        attack = FastGradientMethod(
            classifier, norm=np.inf, eps=eps, eps_step=eps, targeted=False, batch_size=batch_size
        )
        adversarial = attack.generate(x=clean, y=y)
    return _outcome(model, eps, _project(adversarial, clean, eps), y, batch_size, device)


def default_step_size(eps: float, steps: int) -> float:
    """PGD's step when none is given: ``2.5 * eps / steps`` (Madry et al.), so the iterates can
    cross the ball more than once and still end anywhere inside it."""
    return 2.5 * eps / max(steps, 1)


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
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * gradient.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0.0, 1.0).detach()


def pgd_attack(
    model: nn.Module,
    images: Images,
    labels: np.ndarray | torch.Tensor | Sequence[int],
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
    eps = check_eps(eps)
    if steps < 1:
        raise MedtransferError(f"PGD needs at least one step, got {steps}.")
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
    if eps == 0.0 or len(clean) == 0:
        return _outcome(model, eps, clean.copy(), y, batch_size, device)
    step = float(step_size) if step_size is not None else default_step_size(eps, steps)
    if not step > 0:
        raise MedtransferError(f"PGD step size must be positive, got {step_size!r}.")
    generator = torch.Generator().manual_seed(seed)
    adversarial = np.empty_like(clean)
    with preserved_state(model):
        model.to(device).eval()
        for batch in _batches(len(clean), batch_size):
            x = torch.from_numpy(clean[batch]).to(device)
            target = torch.from_numpy(y[batch]).to(device)
            perturbed = pgd_perturb(model, x, target, eps, steps, step, generator, random_init)
            adversarial[batch] = perturbed.cpu().numpy()
    return _outcome(model, eps, _project(adversarial, clean, eps), y, batch_size, device)


def apgd_attack(
    model: nn.Module,
    images: Images,
    labels: np.ndarray | torch.Tensor | Sequence[int],
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
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
    if eps == 0.0 or len(clean) == 0:
        return _outcome(model, eps, clean.copy(), y, batch_size, device)
    from art.attacks.evasion import AutoProjectedGradientDescent

    with preserved_state(model), _numpy_global_seed(seed):
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
    return _outcome(model, eps, _project(adversarial, clean, eps), y, batch_size, device)


def noise_attack(
    model: nn.Module,
    images: Images,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    eps: float,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: Device = "cpu",
) -> AttackOutcome:
    """The control: i.i.d. uniform noise in [-eps, eps] per pixel, clipped to [0, 1]."""
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
    rng = np.random.default_rng(seed)
    noisy = clean + rng.uniform(-eps, eps, size=clean.shape).astype(np.float32)
    return _outcome(model, eps, _project(noisy, clean, eps), y, batch_size, device)


# --------------------------------------------------------------------------------------------
# teacher-transfer attacks (crafted on the teacher's features only)


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
        for batch in _batches(len(clean), batch_size):
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
    return _project(adversarial, clean, eps)


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
    if eps == 0.0 or len(clean) == 0:
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
    if eps == 0.0 or len(clean) == 0:
        return clean.copy()
    step = float(step_size) if step_size is not None else default_step_size(eps, steps)
    from art.attacks.evasion import FeatureAdversariesPyTorch
    from art.estimators.classification import PyTorchClassifier

    head = _FeatureOutput(teacher_features)
    torch_device = torch.device(device)
    with preserved_state(teacher_features), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        estimator = PyTorchClassifier(
            model=head,
            loss=nn.MSELoss(),  # unused by the attack, required by the estimator
            input_shape=tuple(clean.shape[1:]),
            nb_classes=max(2, int(head(torch.from_numpy(clean[:1])).shape[1])),
            clip_values=(0.0, 1.0),
            device_type="gpu" if torch_device.type == "cuda" else "cpu",
        )
        attack = FeatureAdversariesPyTorch(
            estimator,
            delta=eps,
            layer="features",
            max_iter=steps,
            step_size=step,
            batch_size=batch_size,
            random_start=False,  # towards a target the gradient at the clean image is not zero
            verbose=False,
        )
        adversarial = attack.generate(x=clean, y=targets)
    return _project(np.asarray(adversarial, dtype=np.float32), clean, eps)


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
    labels: np.ndarray | torch.Tensor | Sequence[int],
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
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    y = as_label_array(labels, len(clean))
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
    base = _outcome(student, eps, adversarial, y, batch_size, device)
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


# --------------------------------------------------------------------------------------------
# the whole check


def check_step_fraction(pgd_step_size: float | None, pgd_steps: int) -> float:
    """Resolve PGD's step as a fraction of eps, refusing steps too small to reach the ball's edge.

    A fraction below ``1 / pgd_steps`` means the iterates can never travel the full budget,
    which silently weakens the attack; that is what passing an absolute step (e.g. ``0.5/255``)
    where a fraction is expected would do.
    """
    if pgd_steps < 1:
        raise MedtransferError(f"pgd_steps must be at least 1, got {pgd_steps}.")
    fraction = 2.5 / pgd_steps if pgd_step_size is None else float(pgd_step_size)
    if not math.isfinite(fraction) or fraction <= 0 or fraction * pgd_steps < 1.0:
        raise MedtransferError(
            f"pgd_step_size={pgd_step_size!r} is a fraction of each budget; with {pgd_steps} steps "
            f"it must be at least 1/{pgd_steps} = {1 / pgd_steps:.3g} for PGD to reach the edge of "
            f"the ball (null uses 2.5/steps = {2.5 / pgd_steps:.3g})."
        )
    return fraction


def _clean_row(clean_acc: float, clean_predictions: np.ndarray, labels: np.ndarray) -> EpsilonRow:
    success = 0.0 if np.any(clean_predictions == labels) else math.nan
    return EpsilonRow(
        eps=0.0,
        fgsm_acc=clean_acc,
        pgd_acc=clean_acc,
        teacher_transfer_acc=clean_acc,
        teacher_transfer_success=success,
        teacher_mimicry_acc=clean_acc,
        teacher_mimicry_success=success,
        noise_acc=clean_acc,
        apgd_acc=clean_acc,
        universal_fooling=0.0,
    )


@dataclass
class _Run:
    """What every budget of one :func:`evaluate_robustness` call shares."""

    student: nn.Module
    teacher_features: nn.Module
    clean: np.ndarray
    labels: np.ndarray
    clean_predictions: np.ndarray
    pgd_steps: int
    fraction: float
    apgd_steps: int
    natural_images: np.ndarray | None
    universal_steps: int
    seed: int
    target_pool: tuple[Images, np.ndarray] | None
    crafted: dict | None
    common: dict
    # Per white-box attack ("fgsm", "pgd", and "worst": every attack including APGD-CE), the
    # images it has not fooled at any budget so far; all start as the clean-correct images.
    robust: dict[str, np.ndarray] = field(default_factory=dict)


def _attack_survivors(
    run: _Run, name: str, attack: Callable[[np.ndarray, np.ndarray], AttackOutcome]
) -> np.ndarray:
    """Run ``attack(images, labels)`` on the images ``run.robust[name]`` still holds, and drop
    those it fools; returns the updated mask ``(N,)``.

    An image fooled at a smaller budget is fooled at every larger one (that perturbation is
    allowed there too), so it is not attacked again: each white-box line can only fall with
    the budget, and once an undefended student is at 0, larger budgets cost nothing.
    """
    robust = run.robust[name]
    rows = np.flatnonzero(robust)
    if len(rows):
        outcome = attack(run.clean[rows], run.labels[rows])
        robust[rows] = outcome.predictions == run.labels[rows]
    return robust


def _white_box(run: _Run, eps: float, index: int) -> tuple[float, float, float]:
    """FGSM, PGD and the worst-case white-box accuracy at ``eps`` (see ``EpsilonRow``), each
    over the images no smaller budget of it fooled.

    APGD-CE runs only on images that FGSM and PGD here, and every attack at smaller budgets,
    left correct: the others are already fooled within this budget.
    """
    fgsm = _attack_survivors(
        run, "fgsm", lambda x, y: fgsm_attack(run.student, x, y, eps, **run.common)
    )
    pgd = _attack_survivors(
        run,
        "pgd",
        lambda x, y: pgd_attack(
            run.student,
            x,
            y,
            eps,
            steps=run.pgd_steps,
            step_size=run.fraction * eps,
            seed=_derive_seed(run.seed, 1, index),
            **run.common,
        ),
    )
    run.robust["worst"] &= fgsm & pgd
    worst = _attack_survivors(
        run,
        "worst",
        lambda x, y: apgd_attack(
            run.student,
            x,
            y,
            eps,
            steps=run.apgd_steps,
            seed=_derive_seed(run.seed, 5, index),
            **run.common,
        ),
    )
    return float(fgsm.mean()), float(pgd.mean()), float(worst.mean())


def _universal(run: _Run, eps: float, index: int) -> float:
    """The fooling rate of the natural-image universal perturbation at ``eps`` (NaN: none)."""
    from tasks.robustness.universal import craft_universal_perturbation, universal_fooling_rate

    if run.natural_images is None:
        return math.nan
    key = ("universal", eps, run.universal_steps, run.seed, len(run.natural_images))
    if run.crafted is not None and key in run.crafted:
        delta = run.crafted[key]
    else:
        delta = craft_universal_perturbation(
            run.teacher_features,
            run.natural_images,
            eps,
            steps=run.universal_steps,
            seed=_derive_seed(run.seed, 6, index),
            **run.common,
        )
        if run.crafted is not None:
            run.crafted[key] = delta
    rate, _ = universal_fooling_rate(
        run.student, run.clean, delta, run.clean_predictions, **run.common
    )
    return rate


def _budget_row(
    run: _Run, eps: float, index: int, on_budget: Callable[[EpsilonRow], None] | None = None
) -> EpsilonRow:
    """Every attack at one budget; ``on_budget`` is told the row when they are done."""
    fgsm_acc, pgd_acc, worst_acc = _white_box(run, eps, index)
    transfers = {
        mode: teacher_transfer_attack(
            run.student,
            run.teacher_features,
            run.clean,
            run.labels,
            eps,
            mode=mode,
            target_pool=run.target_pool,
            steps=run.pgd_steps,
            step_size=run.fraction * eps,
            seed=_derive_seed(run.seed, 2 + k, index),
            clean_predictions=run.clean_predictions,
            crafted=run.crafted,
            **run.common,
        )
        for k, mode in enumerate(("untargeted", "mimicry"))
    }
    noise = noise_attack(
        run.student,
        run.clean,
        run.labels,
        eps,
        seed=_derive_seed(run.seed, 4, index),
        **run.common,
    )
    row = EpsilonRow(
        eps=eps,
        fgsm_acc=fgsm_acc,
        pgd_acc=pgd_acc,
        teacher_transfer_acc=transfers["untargeted"].accuracy,
        teacher_transfer_success=transfers["untargeted"].success_rate,
        teacher_mimicry_acc=transfers["mimicry"].accuracy,
        teacher_mimicry_success=transfers["mimicry"].success_rate,
        noise_acc=noise.accuracy,
        apgd_acc=worst_acc,
        universal_fooling=_universal(run, eps, index),
    )
    if on_budget is not None:
        on_budget(row)
    return row


def _checked_inputs(
    images: Images, labels: np.ndarray | torch.Tensor | Sequence[int], epsilons: Sequence[float]
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


def evaluate_robustness(
    student: nn.Module,
    teacher_features: nn.Module,
    images: Images,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    epsilons: Sequence[float],
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: Device = "cpu",
    *,
    apgd_steps: int = 20,
    natural_images: np.ndarray | None = None,
    universal_steps: int = 20,
    target_pool: tuple[Images, np.ndarray] | None = None,
    crafted: dict | None = None,
    on_budget: Callable[[EpsilonRow], None] | None = None,
) -> RobustnessResult:
    """Measure the student under every attack at every budget.

    Args:
        student: the classifier under test (pixel space in, logits out).
        teacher_features: the pristine public teacher's feature extractor; the transfer and
            universal attacks are crafted on it alone.
        images: float ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)`` class indices.
        epsilons: L-inf budgets in pixel units, e.g. ``[0, 1/255, 2/255, 4/255]``; sorted and
            de-duplicated. Budget 0 is the clean row (success and fooling rates 0).
        pgd_steps: iterations of PGD and of both teacher-transfer attacks.
        pgd_step_size: their step **as a fraction of each budget**; ``None`` is
            ``2.5 / pgd_steps``. See :func:`check_step_fraction`.
        batch_size: images per forward/backward pass.
        seed: every random start, noise draw and mimicry target derives from it.
        device: where the models run (they are moved there).
        apgd_steps: APGD-CE iterations (the reported white-box figure, ``apgd_acc``).
        natural_images: ``(M, C, H, W)`` natural images for the universal perturbation
            (:func:`tasks.robustness.universal.natural_crops`); ``None`` skips it.
        universal_steps: its crafting iterations.
        target_pool: ``(images, labels)`` for mimicry targets; default: ``images``.
        crafted: share one dict between calls that attack several students on the same images
            with the same teacher: teacher-crafted perturbations are crafted only once.
        on_budget: told each budget's row as soon as its attacks are done (progress).

    Returns:
        A :class:`RobustnessResult` (no adversarial images are kept).
    """
    clean, y, budgets = _checked_inputs(images, labels, epsilons)
    fraction = check_step_fraction(pgd_step_size, pgd_steps)
    clean_predictions = predict(student, clean, batch_size=batch_size, device=device)
    clean_acc = float(np.mean(clean_predictions == y))
    run = _Run(
        student=student,
        teacher_features=teacher_features,
        clean=clean,
        labels=y,
        clean_predictions=clean_predictions,
        pgd_steps=pgd_steps,
        fraction=fraction,
        apgd_steps=apgd_steps,
        natural_images=natural_images,
        universal_steps=universal_steps,
        seed=seed,
        target_pool=target_pool,
        crafted=crafted,
        common={"batch_size": batch_size, "device": device},
        robust={name: clean_predictions == y for name in ("fgsm", "pgd", "worst")},
    )
    rows = [
        _clean_row(clean_acc, clean_predictions, y)
        if eps == 0.0
        else _budget_row(run, eps, index, on_budget)
        for index, eps in enumerate(budgets)
    ]
    return RobustnessResult(
        clean_acc=clean_acc,
        n_examples=len(clean),
        rows=tuple(rows),
        pgd_steps=pgd_steps,
        pgd_step_size=fraction,
        seed=seed,
    )
