"""Features of a frozen trunk, computed once: the linear probe without augmentation and the LP
stage of LP-FT train a head on them instead of pushing every image through the backbone again
every epoch (on a CPU the backbone is nearly all of an epoch's time).

A frozen trunk in eval mode is a fixed function of the image, so with no augmentation its
features are the same every epoch: caching them changes nothing but the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tasks.data.preprocess import uint8_to_model_pixels
from tasks.model.label_kind import kind_of_labels

FEATURE_BATCH = 64
# LP-FT's probe strengths, tried on validation (Kumar et al. 2022 sweep the logistic
# regression's L2 the same way): on the synthetic default at 64 px the training split's
# features are separable, and the weakest L2 (train.weight_decay, 1e-4) fitted a head of
# weight norm 12 with training loss 0.02 and validation loss 0.81; 1e-2 gave 0.32.
PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def frozen_features(model: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``model.features`` of uint8 ``(N, H, W)`` images (pixels / 255, eval mode, no grad) →
    float32 ``(N, D)`` on the CPU. The model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    chunks = []
    for first in range(0, len(images), FEATURE_BATCH):
        x = torch.from_numpy(uint8_to_model_pixels(images[first : first + FEATURE_BATCH]))
        chunks.append(model.features(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


class HeadOnly(nn.Module):
    """A student's dropout and head over cached features: ``(B, D)`` → logits ``(B, C)``.

    It holds the student's own modules, so training it trains the student's head; its state
    dict (``dropout``, ``head.*``) is what its checkpoints hold.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.dropout = student.dropout
        self.head = student.head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


def feature_datasets(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    device: torch.device,
) -> tuple[TensorDataset, TensorDataset]:
    """``(features, label)`` datasets of the training and validation ``(images, labels)``
    (labels long ``(N,)``, or float ``(N, K)`` findings)."""
    return tuple(
        TensorDataset(frozen_features(model, images, device), _label_tensor(labels))
        for images, labels in (train, val)
    )


def _label_tensor(labels: np.ndarray) -> torch.Tensor:
    """Class indices as long ``(N,)``; findings ``(N, K)`` as float32, what BCE takes."""
    return torch.as_tensor(labels, dtype=torch.float32 if np.ndim(labels) == 2 else torch.long)


def fit_linear_head(
    head: nn.Linear,
    features: torch.Tensor,
    labels: np.ndarray,
    class_weights: torch.Tensor | None,
    l2: float,
    max_iter: int = 200,
) -> float:
    """The LP stage of LP-FT: fit ``head`` to ``(N, D)`` features by full-batch L-BFGS on the
    (class-weighted) cross-entropy plus ``l2 * ||W||^2`` (a logistic regression, as in Kumar et
    al. 2022). Deterministic; returns the final training loss. Findings ``(N, K)``: the
    (``pos_weight``-weighted) binary cross-entropy of one sigmoid per finding instead."""
    features = features.to(head.weight.device)
    targets = _label_tensor(labels).to(features.device)
    criterion = kind_of_labels(labels).loss(
        class_weights.to(features.device) if class_weights is not None else None
    )
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = criterion(head(features), targets) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        return float(closure().detach())


@dataclass(frozen=True)
class ProbeFit:
    """The LP stage's outcome: the L2 strength chosen, the head's training loss (with its L2
    term) and its validation cross-entropy (unweighted, like the loop's ``val_loss``)."""

    l2: float
    train_loss: float
    val_loss: float


def fit_probe_on_validation(
    head: nn.Linear,
    train: tuple[torch.Tensor, np.ndarray],
    val: tuple[torch.Tensor, np.ndarray],
    class_weights: torch.Tensor | None,
    grid: tuple[float, ...] = PROBE_L2_GRID,
) -> ProbeFit:
    """Fit ``head`` to the ``(N, D)`` training features and labels once per L2 strength of
    ``grid`` (each from ``head``'s starting weights) and keep the one with the lowest
    validation cross-entropy on the ``(M, D)`` validation features; ties go to the stronger
    L2 (the smaller head). ``head`` ends with the chosen fit's weights."""
    start = {k: v.detach().clone() for k, v in head.state_dict().items()}
    targets = torch.as_tensor(val[1], dtype=torch.long)
    best: tuple[ProbeFit, dict] | None = None
    for l2 in sorted(grid, reverse=True):
        head.load_state_dict(start)
        train_loss = fit_linear_head(head, train[0], train[1], class_weights, l2)
        with torch.no_grad():
            logits = head(val[0].to(head.weight.device)).cpu()
            val_loss = float(nn.functional.cross_entropy(logits, targets))
        if best is None or val_loss < best[0].val_loss:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            best = (ProbeFit(l2, train_loss, val_loss), state)
    head.load_state_dict(best[1])
    return best[0]
