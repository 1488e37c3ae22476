"""Validation during training: the loss, AUC and accuracy of one epoch's model on the
validation split, the row :func:`tasks.training.loop.fit` selects and stops early on."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tasks.evaluation.metrics import roc_auc
from tasks.evaluation.multilabel import finding_measures
from tasks.model.label_kind import MULTI_LABEL
from tasks.model.predict import probabilities_and_labels


def validation_metrics(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = False,
    multilabel: bool = False,
) -> dict[str, float]:
    """``{"val_loss", "val_auc", "val_accuracy"}`` of ``model`` over ``loader``.

    ``val_auc`` is NaN when the loader holds one class only. ``multilabel``: the mean binary
    cross-entropy, the macro AUC over findings and the share of image-finding cells right
    at 0.5 (:func:`multilabel_validation`).
    """
    if multilabel:
        return multilabel_validation(model, loader, device, amp, channels_last)
    probabilities, labels = probabilities_and_labels(model, loader, device, amp, channels_last)
    log_probabilities = torch.log(torch.from_numpy(probabilities).clamp_min(1e-8))
    return {
        "val_loss": float(nn.functional.nll_loss(log_probabilities, torch.from_numpy(labels))),
        "val_auc": roc_auc(labels, probabilities),
        "val_accuracy": float((probabilities.argmax(axis=1) == labels).mean()),
    }


def multilabel_validation(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, channels_last: bool
) -> dict[str, float]:
    """A multi-label model's validation row: mean BCE, macro AUC over the findings that have
    both outcomes in ``loader`` (NaN if none has), cell accuracy at 0.5; both over the known
    image-finding cells."""
    probabilities, labels = probabilities_and_labels(
        model, loader, device, amp, channels_last, kind=MULTI_LABEL
    )
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    half = np.full(labels.shape[1], 0.5)
    macro = finding_measures(labels, probabilities, half, np.ones((1, len(labels))))["macro_auc"]
    known = np.isfinite(labels)  # NaN: unknown, left out as the training loss leaves it out
    y = labels[known]
    return {
        "val_loss": float(-np.mean(y * np.log(p[known]) + (1 - y) * np.log1p(-p[known]))),
        "val_auc": float(macro[0]),
        "val_accuracy": float((MULTI_LABEL.decide(probabilities, 0.5)[known] == y).mean()),
    }
