"""Augmentation on whole batches (tasks.training.augment) against the per-image MONAI chain it
replaces: the same transforms moving images as much, along the same axis, seeded replay, and
a resumed fit with it ending on the same weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import load_params
from tasks.data.synthetic import chest_scene
from tasks.model.transforms import ImageDataset, train_transform
from tasks.training.augment import BatchAugment
from tests.toy_fit import CrashAfter, toy_fit

AUGMENT = load_params(Path(__file__).resolve().parent.parent / "params.yaml").train.augment
OFF = replace(
    AUGMENT, flip=False, rotate_degrees=0.0, scale=0.0, translate=0.0, contrast_gamma=0.0,
    noise_std=0.0, colour_jitter=0.0,
)  # fmt: skip
SIZE = 32


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    """Twelve uint8 32 px chest scenes (the generator's)."""
    rng = np.random.default_rng(0)
    return np.stack([np.rint(chest_scene(SIZE, rng, 0.5) * 255) for _ in range(12)]).astype(
        np.uint8
    )


def _mean_change(config, scenes: np.ndarray, draws: int = 6) -> tuple[float, float]:
    """Mean absolute pixel change (per image, then over images and draws) of the MONAI chain
    and of the batch augmentation, both seeded the same way."""
    base = torch.from_numpy(scenes.astype(np.float32) / 255)[:, None]
    per_image = ImageDataset(scenes, np.zeros(len(scenes), int), train_transform(config, SIZE))
    batch = BatchAugment(config, SIZE)
    old, new = [], []
    for draw in range(draws):
        per_image.transform.set_random_state(draw)
        batch.seed(draw)
        old.append(torch.stack([per_image[i][0] for i in range(len(scenes))]).sub(base).abs())
        new.append(batch(base).sub(base).abs())
    return float(torch.stack(old).mean()), float(torch.stack(new).mean())


@pytest.mark.parametrize(
    "change",
    [
        {"flip": True},
        {"rotate_degrees": 10.0},
        {"scale": 0.1},
        {"translate": 0.05},
        {"contrast_gamma": 0.2},
        {"noise_std": 0.01},
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_transform_moves_images_as_much_as_the_per_image_monai_chain(
    scenes: np.ndarray, change: dict
) -> None:
    old, new = _mean_change(replace(OFF, **change), scenes)
    assert old > 0 and new == pytest.approx(old, rel=0.2)


def test_scale_and_shift_move_rows_only_as_the_monai_chain_does() -> None:
    """A float scale or translate range is MONAI's first axis alone: an image that varies only
    across columns is left as it was, one that varies only down rows is moved."""
    ramp = np.tile(np.linspace(0, 255, SIZE), (SIZE, 1)).astype(np.uint8)  # varies by column
    config = replace(OFF, scale=0.1, translate=0.1)
    for image, moved in ((ramp, False), (ramp.T.copy(), True)):
        pixels = torch.from_numpy(image.astype(np.float32) / 255)[None, None].repeat(8, 1, 1, 1)
        monai = ImageDataset(
            image[None].repeat(8, 0), np.zeros(8, int), train_transform(config, SIZE)
        )
        monai.transform.set_random_state(0)
        batch = BatchAugment(config, SIZE)
        old = torch.stack([monai[i][0] for i in range(8)])
        new = batch(pixels)
        for out in (old, new):
            assert (out.sub(pixels).abs().max() > 0.01) == moved


def test_the_same_seed_replays_the_same_batch_and_another_seed_does_not(scenes) -> None:
    base = torch.from_numpy(scenes.astype(np.float32) / 255)[:, None]
    batch = BatchAugment(AUGMENT, SIZE)
    batch.seed(3)
    first = batch(base)
    batch.seed(3)
    assert torch.equal(batch(base), first)
    batch.seed(4)
    assert not torch.equal(batch(base), first)
    assert first.min() >= 0 and first.max() <= 1


def test_with_every_transform_off_batches_pass_unchanged(scenes) -> None:
    base = torch.from_numpy(scenes.astype(np.float32) / 255)[:, None]
    batch = BatchAugment(replace(OFF, colour_jitter=0.1), SIZE, channels=1)  # gray: no jitter
    assert not batch.active
    assert torch.equal(batch(base), base)


def test_the_colour_jitter_moves_colour_batches_only() -> None:
    colour = torch.rand(8, 3, SIZE, SIZE)
    jitter = BatchAugment(replace(OFF, colour_jitter=0.3), SIZE, channels=3)
    assert jitter.active
    out = jitter(colour)
    changed = out.sub(colour).abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < 8  # probability 0.5 per image


def test_a_resumed_fit_with_batch_augmentation_ends_on_the_same_weights(tmp_path: Path) -> None:
    """In channels_last on the CPU, as training now runs; the model ends in the default
    memory format (a convolution of 4 input channels shows it: with 1, both formats have the
    same strides)."""

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(4, 4, 3, padding=1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 2),
        )

    run = {"epochs": 2, "channels_last": True}
    straight, _ = toy_fit(tmp_path / "a", model=model(), augment=BatchAugment(AUGMENT, 16), **run)
    with pytest.raises(KeyboardInterrupt):
        crash = (CrashAfter(1),)
        toy_fit(
            tmp_path / "b", model=model(), augment=BatchAugment(AUGMENT, 16), recorders=crash, **run
        )
    resumed, result = toy_fit(
        tmp_path / "b", resume=True, model=model(), augment=BatchAugment(AUGMENT, 16), **run
    )
    assert result.resumed_from_epoch == 1
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
        assert value.is_contiguous(), key
