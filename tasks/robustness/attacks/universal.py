"""The attack that needs no medical data: a universal perturbation crafted on the public
teacher from natural images alone, then added to every test image of the student.

An outsider who knows only which public teacher a student was built on can mount it: no
medical image, no query to the student (Hirano et al., BMC Med. Imaging 2021; Minagi et al.,
J. Imaging 2022). The natural images are scikit-image's bundled sample photographs (cameraman,
coffee, coins, textures, ...), cut into seeded random crops; no file of the dataset is read.
Registered as ``universal_fooling``: the share of images whose predicted class it changes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.robustness.attacks._base import AttackContext, Gate, Measure
from tasks.robustness.attacks._common import check_eps, predict, preserved_state, project
from tasks.robustness.result import NOT_MEASURED, Rate

# scikit-image's sample images that ship inside the package (no download) and are not medical.
NATURAL_IMAGES = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "moon", "page", "rocket", "text",
)  # fmt: skip


def natural_crops(n: int, size: int, seed: int, channels: int = 1) -> np.ndarray:
    """``n`` seeded random square crops of the sample photographs, greyscale (``channels``
    1) or RGB (3; a gray photograph as three equal channels), resized to ``size``: float32
    ``(n, channels, size, size)`` in [0, 1]. The same crops whatever ``channels``."""
    # Deferred: scikit-image is a heavy import that only this function needs.
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = []
    for name in NATURAL_IMAGES:
        image = getattr(data, name)()
        if channels == 1:
            photos.append(rgb2gray(image[..., :3]) if image.ndim == 3 else image / 255.0)
        else:
            rgb = image[..., :3] / 255.0 if image.ndim == 3 else np.stack([image / 255.0] * 3, -1)
            photos.append(rgb)
    crops = np.empty((n, channels, size, size), dtype=np.float32)
    for k in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2]) + 1))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        crop = photo[top : top + side, left : left + side]
        resized = resize(crop, (size, size), anti_aliasing=True)
        crops[k] = resized[None] if channels == 1 else np.moveaxis(resized, -1, 0)
    return np.clip(crops, 0.0, 1.0)


def craft_universal_perturbation(
    teacher_features: nn.Module,
    natural: np.ndarray,
    eps: float,
    *,
    steps: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """One perturbation ``(1, C, H, W)`` within ``eps`` (L-inf) that moves the teacher's
    features of every natural image as far as possible: signed-gradient ascent on
    ``sum_i ||f(x_i + d) - f(x_i)||^2`` over all crops, from a seeded random start.

    Args:
        natural: float ``(N, C, H, W)`` natural images in [0, 1] (:func:`natural_crops`).
    """
    eps = check_eps(eps)
    shape = (1, *natural.shape[1:])
    if eps == 0.0:
        return np.zeros(shape, dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    delta = ((torch.rand(shape, generator=generator) * 2 - 1) * eps / 2).to(device)
    step = 2.5 * eps / steps
    with preserved_state(teacher_features):
        teacher_features.to(device)
        x = torch.from_numpy(natural).to(device)
        with torch.no_grad():
            clean = torch.cat(
                [
                    teacher_features(x[i : i + batch_size]).flatten(1)
                    for i in range(0, len(x), batch_size)
                ]
            )
        for _ in range(steps):
            gradient = torch.zeros_like(delta)
            for i in range(0, len(x), batch_size):
                d = delta.detach().requires_grad_(True)
                moved = teacher_features((x[i : i + batch_size] + d).clamp(0.0, 1.0)).flatten(1)
                loss = (moved - clean[i : i + batch_size]).pow(2).sum()
                gradient += torch.autograd.grad(loss, d)[0]
            delta = (delta + step * gradient.sign()).clamp(-eps, eps)
    return delta.detach().cpu().numpy().astype(np.float32)


def universal_fooling_rate(
    model: nn.Module,
    images: np.ndarray,
    perturbation: np.ndarray,
    clean_predictions: np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """The share of ``images`` whose predicted class the perturbation changes, and how many.

    Args:
        images: float ``(N, C, H, W)`` in [0, 1]; perturbation: ``(1, C, H, W)``, added to
            each and clipped to [0, 1]; clean_predictions: ``(N,)`` the model's classes on
            ``images``.
    """
    eps = float(np.abs(perturbation).max()) if perturbation.size else 0.0
    perturbed = project(images + perturbation, images, eps)
    changed = predict(model, perturbed, batch_size=batch_size, device=device) != clean_predictions
    return (float(changed.mean()) if len(changed) else float("nan")), int(changed.sum())


class Universal:
    """One perturbation per budget crafted on the teacher from ``context.natural_images`` (once
    for every model attacked with the same ``context.crafted``); NaN when there are none."""

    name = "universal"
    measures = (
        Measure(
            "universal_fooling",
            "universal-perturbation (natural images, teacher) fooling rate",
            "change",
        ),
    )
    gates = (
        Gate("max_universal_fooling", "universal_eps", ("universal_fooling",), default_eps=2 / 255),
    )

    def run(self, context: AttackContext, eps: float) -> dict[str, Rate]:
        natural = context.natural_images
        if natural is None:
            return {"universal_fooling": NOT_MEASURED}
        steps = context.settings.universal_steps
        key = ("universal", eps, steps, context.seed, len(natural))
        crafted = context.crafted if context.crafted is not None else {}
        if key not in crafted:
            crafted[key] = craft_universal_perturbation(
                context.teacher_features,
                natural,
                eps,
                steps=steps,
                seed=context.seed_for(self.name, eps),
                **context.common,
            )
        _, changed = universal_fooling_rate(
            context.student, context.clean, crafted[key], context.clean_predictions,
            **context.common,
        )  # fmt: skip
        return {"universal_fooling": Rate.of(changed, len(context.clean))}


ATTACK = Universal()
