"""Progressive resizing (``train.progressive_size``, ``train.progressive_share``): the plan of
sides, the batches a fit really trains on, the downsampling itself, and early stopping that
counts only the epochs at the side the student is served at."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tasks.training import schedule
from tasks.training.augment import downsample
from tasks.training.types import FitConfig
from tests.toy_fit import SHIPPED, CrashAfter, toy_fit, toy_model


@pytest.mark.parametrize(
    ("epochs", "small", "share", "full", "sides"),
    [
        (12, 64, 0.75, 128, [64] * 9 + [128] * 3),  # the first three quarters at 64 px
        (12, 64, 0.5, 96, [64] * 6 + [96] * 6),
        (12, None, 0.75, 128, [128] * 12),  # off
        (12, 128, 0.75, 128, [128] * 12),  # not below the images' side: off
        (12, 256, 0.75, 128, [128] * 12),
        (4, 64, 1.0, 128, [64, 64, 64, 128]),  # the last epoch is always at the full side
        (1, 64, 0.75, 128, [128]),
        (12, 64, 0.0, 128, [128] * 12),
    ],
)
def test_the_first_share_of_the_planned_epochs_trains_small_and_the_rest_at_the_full_side(
    epochs: int, small: int | None, share: float, full: int, sides: list[int]
) -> None:
    shipped = FitConfig.from_train(SHIPPED.train, seed=0, checkpoint_dir="unused", resume=False)
    config = replace(shipped, progressive_size=small, progressive_share=share)
    assert [schedule.epoch_side(config, e, epochs, full) for e in range(epochs)] == sides


class _SideRecorder(nn.Module):
    """The toy model, noting the side of every batch it sees and whether it was training."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = toy_model()
        self.seen: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, int(x.shape[-1])))
        return self.inner(x)


def test_a_progressive_fit_trains_its_first_epochs_on_downsampled_batches_and_validates_at_full(
    tmp_path: Path,
) -> None:
    # 96 toy images of 16 px in batches of 16: 6 steps an epoch; half of 4 epochs at 8 px.
    model = _SideRecorder()
    _, result = toy_fit(
        tmp_path, epochs=4, model=model, progressive_size=8, progressive_share=0.5
    )
    trained = [side for training, side in model.seen if training]
    validated = {side for training, side in model.seen if not training}
    assert trained == [8] * 12 + [16] * 12
    assert validated == {16}
    assert [row["train_side"] for row in result.history] == [8, 8, 16, 16]


def test_downsampling_matches_an_image_library_shrinking_the_picture() -> None:
    # torch's antialiased bilinear is PIL's BILINEAR reduction (a triangle filter as wide as
    # the scale); plain bilinear would sample 2 of every 4 pixels and alias the noise.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32)).astype(np.uint8)
    shrunk = Image.fromarray(pixels).resize((8, 8), Image.Resampling.BILINEAR)
    batch = torch.from_numpy(pixels).float().div(255).view(1, 1, 32, 32)
    ours = downsample(batch, 8)
    assert ours.shape == (1, 1, 8, 8)
    expected = torch.from_numpy(np.asarray(shrunk)).float().div(255)
    torch.testing.assert_close(ours[0, 0], expected, rtol=0, atol=1.5 / 255)


def test_downsampling_to_a_side_not_below_the_batches_leaves_them_as_they_are() -> None:
    batch = torch.rand(2, 1, 16, 16)
    assert downsample(batch, 16) is batch
    assert downsample(batch, 32) is batch


def test_early_stopping_counts_only_the_epochs_at_the_full_side(tmp_path: Path) -> None:
    # lr 0: nothing improves after epoch 1. Epochs 1-3 train at 8 px, 4-6 at 16: epochs 2 and
    # 3 do not count, epoch 4 does, so patience 1 stops before epoch 5 (counting every epoch
    # it would stop after epoch 2, before the student ever trained at its full side).
    _, result = toy_fit(
        tmp_path, epochs=6, lr=0.0, patience=1, progressive_size=8, progressive_share=0.5
    )
    assert result.stopped_early
    assert [row["train_side"] for row in result.history] == [8, 8, 8, 16]
    assert result.best_epoch == 1


def test_a_resumed_progressive_fit_keeps_counting_patience_in_full_side_epochs_only(
    tmp_path: Path,
) -> None:
    # Interrupted after epoch 3 (the last small one): its epochs 2 and 3 without a gain must
    # not count after the resume either, so epoch 4 still runs at 16 px.
    run = {"epochs": 6, "lr": 0.0, "patience": 1, "progressive_size": 8, "progressive_share": 0.5}
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path, recorders=(CrashAfter(epoch=3),), **run)
    _, result = toy_fit(tmp_path, resume=True, model=toy_model(), **run)
    assert result.resumed_from_epoch == 3
    assert [row["train_side"] for row in result.history] == [8, 8, 8, 16]


def test_a_progressive_fit_resumed_after_a_crash_ends_on_the_same_weights(tmp_path: Path) -> None:
    run = {"epochs": 4, "progressive_size": 8, "progressive_share": 0.5}
    straight, _ = toy_fit(tmp_path / "straight", **run)
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path / "crashy", recorders=(CrashAfter(epoch=1),), **run)
    resumed, result = toy_fit(tmp_path / "crashy", resume=True, model=toy_model(), **run)
    assert result.resumed_from_epoch == 1
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
