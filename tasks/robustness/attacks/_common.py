"""What every attack shares: checked inputs, the model's state while attacked, predictions on
finished images, seeds, and the projection into the budget's ball.

Images are float ``(N, C, H, W)`` in pixel space [0, 1]; labels int64 ``(N,)``; budgets L-inf
radii in pixel units.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model.label_kind import SINGLE_LABEL
from tasks.model.predict import run_model

Images = np.ndarray | torch.Tensor
Labels = np.ndarray | torch.Tensor | Sequence[int]
Device = str | torch.device

# Images may come back from a float pipeline a hair outside [0, 1]; more than this is a bug.
_RANGE_TOLERANCE = 1e-4


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


def as_label_array(labels: Labels, n: int) -> np.ndarray:
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


def checked(images: Images, labels: Labels, eps: float) -> tuple[float, np.ndarray, np.ndarray]:
    """The opening of every attack: the budget (:func:`check_eps`), the images as float
    pixels ``(N, C, H, W)`` and their labels ``(N,)``."""
    eps = check_eps(eps)
    clean = as_pixel_array(images)
    return eps, clean, as_label_array(labels, len(clean))


def nothing_to_do(eps: float, clean: np.ndarray) -> bool:
    """Budget 0, or no image: the attack returns the clean images without crafting anything."""
    return eps == 0.0 or len(clean) == 0


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


def default_step_size(eps: float, steps: int) -> float:
    """PGD's step when none is given: ``2.5 * eps / steps`` (Madry et al.), so the iterates can
    cross the ball more than once and still end anywhere inside it."""
    return 2.5 * eps / max(steps, 1)


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


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` over ``n`` items."""
    if batch_size < 1:
        raise MedtransferError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def model_outputs(
    model: nn.Module, images: Images, *, batch_size: int = 64, device: Device = "cpu"
) -> np.ndarray:
    """``model``'s float32 logits ``(N, n_classes)`` on ``images``, without any gradient.

    This is the only way a student is evaluated on perturbed images in this package: under
    ``torch.no_grad`` on finished, detached tensors, so no gradient can flow through it.
    """
    array = as_pixel_array(images)
    with preserved_state(model):  # the one forward pass (tasks.model.predict), modes restored
        model.to(device)
        return run_model(model, array, output="logits", batch_size=batch_size, device=device)


def predict(
    model: nn.Module, images: Images, *, batch_size: int = 64, device: Device = "cpu"
) -> np.ndarray:
    """Predicted class indices ``(N,)`` of ``model`` on ``images`` (:func:`model_outputs`)."""
    logits = model_outputs(model, images, batch_size=batch_size, device=device)
    if not len(logits):
        return np.empty(0, np.int64)
    return SINGLE_LABEL.top_class(logits).astype(np.int64)


def derive_seed(seed: int, name: str, eps: float) -> int:
    """An independent 31-bit seed for one attack (``name``) at one budget from the user seed.

    Keyed by the attack's name and the budget itself, so a seed does not change when another
    attack or budget is added.
    """
    key = zlib.crc32(f"{name}@{float(eps):.6f}".encode())
    return int(np.random.SeedSequence([int(seed), key]).generate_state(1)[0] & 0x7FFFFFFF)


@contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global generator for the block, then restore it: ART draws its random
    starts from it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def project(adversarial: np.ndarray, clean: np.ndarray, eps: float) -> np.ndarray:
    """Clip into the L-inf ball around ``clean`` and into [0, 1].

    ART's float32 arithmetic can overshoot eps by an ulp; this makes "within eps" hold to
    float32 precision whatever produced ``adversarial``.
    """
    return np.clip(np.clip(adversarial, clean - eps, clean + eps), 0.0, 1.0).astype(np.float32)


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


def scored(
    model: nn.Module,
    eps: float,
    adversarial: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: Device,
) -> AttackOutcome:
    """``model``'s predictions and accuracy on finished perturbed images."""
    predictions = predict(model, adversarial, batch_size=batch_size, device=device)
    accuracy = float(np.mean(predictions == labels)) if len(labels) else math.nan
    return AttackOutcome(
        eps=eps, adversarial=adversarial, predictions=predictions, accuracy=accuracy
    )
