"""The reference line of the robustness check: a linear probe on the frozen public teacher,
the part of a student that it inherits untouched."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.data.dataset import ProcessedDataset
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.model.student import build_student
from tasks.training.features import fit_linear_head

# Adam's weight_decay of 1e-4 (the probe's old optimiser) is the gradient of 0.5e-4 * ||W||^2.
PROBE_L2 = 0.5e-4


def fit_linear_probe(teacher: str, dataset: ProcessedDataset, steps: int, seed: int) -> nn.Module:
    """A linear probe on the frozen teacher: its head fitted on the train split's features.

    The backbone is never trained, so features are computed once and the head is fitted on
    them by :func:`tasks.training.features.fit_linear_head` (full-batch L-BFGS on the
    class-balanced cross-entropy, at most ``steps`` iterations): seconds, where fine-tuning
    takes minutes.

    Returns:
        The probe (pixel space ``(B, C, S, S)`` in [0, 1] in, C the dataset's channels,
        logits out), in eval mode.
    """
    torch.manual_seed(seed)
    probe = build_student(
        teacher,
        "linear_probe",
        num_classes=len(dataset.classes),
        pretrained=True,
        dropout=0.0,
        channels=dataset.channels,
    )
    probe.eval()
    images, labels = dataset.subset("train")
    with torch.no_grad():
        features = torch.cat(
            [
                probe.features(torch.from_numpy(uint8_to_model_pixels(images[i : i + 64])))
                for i in range(0, len(images), 64)
            ]
        )
    counts = np.bincount(labels, minlength=len(dataset.classes)).clip(min=1)
    weights = torch.as_tensor(len(labels) / (len(counts) * counts), dtype=torch.float32)
    fit_linear_head(probe.head, features, labels, weights, PROBE_L2, max_iter=steps)
    return probe.eval()
