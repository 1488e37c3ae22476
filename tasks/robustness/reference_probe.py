"""The reference line of the robustness check: a linear probe on the frozen public teacher,
the part of a student that it inherits untouched."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.data.dataset import ProcessedDataset
from tasks.model.student import build_student


def fit_linear_probe(teacher: str, dataset: ProcessedDataset, steps: int, seed: int) -> nn.Module:
    """A linear probe on the frozen teacher: its head fitted on the train split's features.

    The backbone is never trained, so features are computed once and the head is fitted on
    them (full-batch Adam, class-balanced loss): seconds, where fine-tuning takes minutes.

    Returns:
        The probe (pixel space ``(B, 1, S, S)`` in [0, 1] in, logits out), in eval mode.
    """
    torch.manual_seed(seed)
    probe = build_student(
        teacher, "linear_probe", num_classes=len(dataset.classes), pretrained=True, dropout=0.0
    )
    probe.eval()
    images, labels = dataset.subset("train")
    with torch.no_grad():
        features = torch.cat(
            [
                probe.features(
                    torch.from_numpy(images[i : i + 64, None].astype(np.float32) / 255.0)
                )
                for i in range(0, len(images), 64)
            ]
        )
    targets = torch.from_numpy(labels)
    counts = torch.bincount(targets, minlength=len(dataset.classes)).clamp_min(1).float()
    criterion = nn.CrossEntropyLoss(weight=len(targets) / (len(counts) * counts))
    optimizer = torch.optim.Adam(probe.head.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(probe.head(features), targets).backward()
        optimizer.step()
    return probe.eval()
