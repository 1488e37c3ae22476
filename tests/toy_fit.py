"""A fit of a tiny network on tiny images, and recorders that note or interrupt it: what
the training-loop tests share (tests/test_training_loop.py, test_batch_augment.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.config import load_params
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.training.augment import BatchAugment
from tasks.training.loop import fit
from tasks.training.types import FitConfig, FitResult, TrainingRecorder

SHIPPED = load_params(Path(__file__).resolve().parent.parent / "params.yaml")


def toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright-centre vs dark-centre 16x16 images with noise (easy but not trivial)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(110, 25, (n, 16, 16))
    images[:, 5:11, 5:11] += np.where(labels[:, None, None] == 1, 40, -40)
    return np.clip(images, 0, 255).astype(np.uint8), labels


class Events(TrainingRecorder):
    """Notes every event the loop reports, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        self.seen.append(("started", total_epochs, start_epoch, n_train))

    def epoch_ended(self, row: dict[str, float]) -> None:
        self.seen.append(("epoch", row["epoch"]))

    def fit_ended(self, result: FitResult) -> None:
        self.seen.append(("ended", result.best_epoch))


class CrashAfter(TrainingRecorder):
    """Interrupts training as Ctrl-C would, once ``epoch`` is done and checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_ended(self, row: dict[str, float]) -> None:
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(16, 2),
    )


def toy_fit(
    tmp_path: Path,
    epochs: int,
    resume: bool = False,
    model: nn.Module | None = None,
    recorders: tuple[TrainingRecorder, ...] = (),
    augment: BatchAugment | None = None,
    **changes,
) -> tuple[nn.Module, FitResult]:
    """A fit of the toy model; with ``augment`` the dataset gives plain pixels and the loop
    augments the batches (as training does), else the dataset augments per image."""
    images, labels = toy_data(96, 0)
    val_images, val_labels = toy_data(48, 1)
    model = model or toy_model()
    config = replace(
        FitConfig(
            epochs=epochs,
            max_steps=None,
            batch_size=16,
            lr=0.01,
            weight_decay=1e-4,
            warmup_epochs=1.0,
            patience=10,
            class_weighting="balanced",
            num_workers=0,
            seed=3,
            device="cpu",
            amp=False,
            channels_last=False,
            checkpoint_dir=str(tmp_path / "ckpt"),
            resume=resume,
        ),
        **changes,
    )
    per_image = train_transform(SHIPPED.train.augment, 16)
    train_set = ImageDataset(images, labels, to_tensor_transform() if augment else per_image)
    val_set = ImageDataset(val_images, val_labels, to_tensor_transform())
    return model, fit(
        model,
        [{"params": model.parameters()}],
        train_set,
        val_set,
        labels,
        2,
        config,
        recorders=recorders,
        augment=augment,
    )
