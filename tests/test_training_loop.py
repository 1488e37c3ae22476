"""The training loop on a tiny network: learning, seeded reproducibility, resume, early stop,
class weights, mixed-precision set-up and the recorders it reports to."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import load_params
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.training import loop, schedule
from tasks.training.loop import (
    CHECKPOINT_NAME,
    _seed_epoch,
    autocast_context,
    class_weights,
    grad_scaler,
)
from tasks.training.recorders import (
    LoggingRecorder,
    ProgressBarRecorder,
    format_duration,
)
from tasks.training.types import FitConfig
from tests.toy_fit import SHIPPED, CrashAfter, Events, toy_data, toy_fit, toy_model


def test_loop_learns_and_checkpoints(tmp_path: Path) -> None:
    _, result = toy_fit(tmp_path, epochs=6)
    assert result.best_val_auc > 0.9
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]  # as logs count
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert (tmp_path / "ckpt" / CHECKPOINT_NAME).is_file()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    _, first = toy_fit(tmp_path / "a", epochs=2)
    _, second = toy_fit(tmp_path / "b", epochs=2)
    for key, value in first.best_state.items():
        assert torch.equal(value, second.best_state[key]), key


def test_resume_after_a_crash_continues_to_the_same_weights(tmp_path: Path) -> None:
    straight_model, _ = toy_fit(tmp_path / "straight", epochs=4)

    # Crash after the second epoch's checkpoint, then resume with a freshly built model.
    with pytest.raises(KeyboardInterrupt):
        toy_fit(tmp_path / "crashy", epochs=4, recorders=(CrashAfter(epoch=2),))
    events = Events()
    resumed_model, resumed = toy_fit(
        tmp_path / "crashy", epochs=4, resume=True, model=toy_model(), recorders=(events,)
    )
    assert events.seen[0] == ("started", 4, 2, 96)
    assert resumed.resumed_from_epoch == 2
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    for key, value in straight_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_early_stopping_stops(tmp_path: Path) -> None:
    # lr 0: nothing improves after the first epoch, so patience 2 stops after epoch 2.
    _, result = toy_fit(tmp_path, epochs=10, lr=0.0, patience=2)
    assert result.stopped_early
    assert len(result.history) == 3
    assert result.best_epoch == 1  # the first epoch, counted from 1


@pytest.mark.parametrize(
    ("epochs", "max_steps", "steps_per_epoch", "planned"),
    [
        (12, None, 147, 12),  # no budget: train.epochs
        (12, 512, 147, 4),  # 3 epochs are 441 steps, short of 512: a fourth
        (12, 441, 147, 3),  # exactly 3 epochs' steps
        (12, 512, 18, 12),  # a small set (BreastMNIST's 546 images) never meets it
        (12, 5, 147, 1),  # at least one epoch
    ],
)
def test_a_step_budget_cuts_the_epochs_to_the_fewest_whole_ones_that_reach_it(
    epochs: int, max_steps: int | None, steps_per_epoch: int, planned: int
) -> None:
    shipped = FitConfig.from_train(SHIPPED.train, seed=0, checkpoint_dir="unused", resume=False)
    config = replace(shipped, epochs=epochs, max_steps=max_steps)
    assert schedule.planned_epochs(config, steps_per_epoch) == planned


def test_a_fit_under_a_step_budget_trains_its_planned_epochs_on_a_schedule_ending_there(
    tmp_path: Path,
) -> None:
    # 96 images in batches of 16: 6 steps an epoch; a budget of 13 steps plans 3 epochs of 10.
    events = Events()
    _, result = toy_fit(tmp_path, epochs=10, max_steps=13, recorders=(events,))
    assert events.seen[0] == ("started", 3, 0, 96)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert not result.stopped_early  # the budget is the plan, not an early stop
    # the cosine reaches 0 at the plan's last step (over 10 epochs it would still be ~0.0085)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("max_steps", "peak_step"), [(None, 147), (441, 37)])
def test_a_step_budget_compresses_the_schedule_and_the_warm_up_keeps_its_share(
    max_steps: int | None, peak_step: int
) -> None:
    # 12 epochs of 147 steps, warm-up 1 epoch: the peak after 147 steps; a budget of 3 epochs
    # keeps the warm-up a twelfth of the schedule, round(147 * 3 / 12) = 37 steps
    shipped = FitConfig.from_train(SHIPPED.train, seed=0, checkpoint_dir="unused", resume=False)
    config = replace(shipped, epochs=12, warmup_epochs=1.0, max_steps=max_steps, lr=0.001)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    scheduler = schedule.warmup_cosine(optimizer, config, steps_per_epoch=147)
    rates = []
    for _ in range(schedule.planned_epochs(config, 147) * 147):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert int(np.argmax(rates)) == peak_step
    assert rates[peak_step] == pytest.approx(config.lr)


@pytest.mark.parametrize("mode", ["balanced", "none"])
def test_class_weighting_modes_run(tmp_path: Path, mode: str) -> None:
    _, result = toy_fit(tmp_path, epochs=1, class_weighting=mode)
    assert len(result.history) == 1


def test_balanced_class_weights_are_the_sample_count_over_classes_times_class_count() -> None:
    # Three negatives, one positive: N / (k * count) = 4 / (2 * 3) and 4 / (2 * 1).
    weights = class_weights(np.array([0, 0, 0, 1]), 2, "balanced")
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]), rtol=0, atol=1e-6)


def test_a_class_absent_from_the_labels_gets_a_finite_weight() -> None:
    weights = class_weights(np.array([0, 0, 1, 1]), 3, "balanced")
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 2 / 3, 4 / 3]), rtol=0, atol=1e-6)


def test_class_weighting_none_gives_no_weights() -> None:
    assert class_weights(np.array([0, 0, 0, 1]), 2, "none") is None


def _epoch_draws(seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented image and a dropout-style torch draw right after seeding ``(seed, epoch)``."""
    images, labels = toy_data(1, 0)
    dataset = ImageDataset(images, labels, train_transform(SHIPPED.train.augment, 16))
    _seed_epoch(seed, epoch, dataset)
    return dataset[0][0], torch.rand(8)


def test_epoch_seeding_replays_the_same_seed_and_epoch_exactly() -> None:
    image, draw = _epoch_draws(seed=3, epoch=1)
    again_image, again_draw = _epoch_draws(seed=3, epoch=1)
    assert torch.equal(image, again_image) and torch.equal(draw, again_draw)


def test_epoch_seeding_makes_augmentation_and_dropout_depend_on_the_seed() -> None:
    image, draw = _epoch_draws(seed=3, epoch=1)
    other_image, other_draw = _epoch_draws(seed=4, epoch=1)
    assert not torch.equal(image, other_image)
    assert not torch.equal(draw, other_draw)


def test_epoch_seeding_makes_augmentation_and_dropout_depend_on_the_epoch() -> None:
    image, draw = _epoch_draws(seed=3, epoch=1)
    next_image, next_draw = _epoch_draws(seed=3, epoch=2)
    assert not torch.equal(image, next_image)
    assert not torch.equal(draw, next_draw)


def test_recorders_hear_the_start_every_epoch_and_the_end_in_order(tmp_path: Path) -> None:
    events = Events()
    _, result = toy_fit(tmp_path, epochs=2, recorders=(events,))
    assert events.seen == [
        ("started", 2, 0, 96),
        ("epoch", 1),
        ("epoch", 2),
        ("ended", result.best_epoch),
    ]


def test_the_logging_recorder_writes_one_line_per_epoch_and_a_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="medtransfer"):
        _, result = toy_fit(tmp_path, epochs=2, recorders=(LoggingRecorder(),))
    lines = [r.getMessage() for r in caplog.records if r.name == "medtransfer.training"]
    assert lines[0] == "training on 96 images for 2 epochs, starting"
    for number, (line, row) in enumerate(zip(lines[1:3], result.history, strict=True), 1):
        assert line.startswith(f"epoch {number}/2: train loss {row['train_loss']:.4f}, ")
        assert f"val AUC {row['val_auc']:.3f}" in line and "images/s, about " in line
    assert lines[2].endswith("about 0s left")  # nothing left after the last epoch
    best_auc = result.history[result.best_epoch - 1]["val_auc"]
    assert lines[3].startswith(
        f"training finished: best epoch {result.best_epoch}/2, best val AUC {best_auc:.3f}, "
        "2 epochs in "
    )
    assert len(lines) == 4


def test_the_progress_bar_counts_epochs_on_stderr_and_is_silent_when_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    toy_fit(tmp_path / "bar", epochs=2, recorders=(ProgressBarRecorder(),))
    assert "train: 100%" in capsys.readouterr().err
    toy_fit(tmp_path / "quiet", epochs=2, recorders=(ProgressBarRecorder(enabled=False),))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("seconds", "text"), [(8.4, "8s"), (75.2, "1m 15s"), (3725, "1h 02m"), (float("nan"), "?")]
)
def test_durations_read_as_hours_minutes_and_seconds(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


class _CountingScaler:
    """Stands in for ``torch.amp.GradScaler`` and counts how many are made."""

    made = 0

    def __init__(self, device: str) -> None:
        type(self).made += 1


def test_fp16_autocast_makes_no_loss_scaler_and_grad_scaler_makes_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An fp16-only GPU, simulated: the scaler must come from grad_scaler, not from each autocast.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.amp, "GradScaler", _CountingScaler)
    monkeypatch.setattr(_CountingScaler, "made", 0)
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is not entered
        contexts = [autocast_context(cuda, True) for _ in range(3)]
    assert all(isinstance(c, torch.autocast) and c.fast_dtype == torch.float16 for c in contexts)
    assert _CountingScaler.made == 0
    assert isinstance(grad_scaler(cuda, True), _CountingScaler) and _CountingScaler.made == 1


@pytest.mark.parametrize(
    ("device", "amp", "bf16"), [("cpu", True, False), ("cuda", False, False), ("cuda", True, True)]
)
def test_no_loss_scaler_without_fp16_autocast(
    monkeypatch: pytest.MonkeyPatch, device: str, amp: bool, bf16: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert grad_scaler(torch.device(device), amp) is None


def test_a_fit_makes_its_loss_scaler_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_grad_scaler(device: torch.device, enabled: bool) -> None:
        calls.append(device)

    monkeypatch.setattr(loop, "grad_scaler", counting_grad_scaler)
    toy_fit(tmp_path, epochs=2)
    assert len(calls) == 1


@pytest.mark.usefixtures("prefect_harness")
def test_the_prefect_recorder_leaves_one_real_progress_artifact_at_100(tmp_path: Path) -> None:
    """On Prefect's test server: each fit makes one progress artifact and ends it at 100."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.progress import PrefectProgressRecorder

    key = "loop-test-progress"

    @flow(name="fit-with-progress")
    def fit_in_a_flow() -> None:
        toy_fit(tmp_path, epochs=2, recorders=(PrefectProgressRecorder(key),))

    fit_in_a_flow()
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert [(artifact.type, artifact.data) for artifact in found] == [("progress", 100.0)]
    assert found[0].description.startswith("done: best epoch")


def test_fit_config_takes_each_loop_setting_from_the_train_key_of_its_name() -> None:
    train = SHIPPED.train
    config = FitConfig.from_train(train, seed=7, checkpoint_dir=Path("runs/x"), resume=True)
    assert config == FitConfig(
        epochs=train.epochs,
        max_steps=train.max_steps,
        batch_size=train.batch_size,
        lr=train.lr,
        weight_decay=train.weight_decay,
        warmup_epochs=train.warmup_epochs,
        patience=train.patience,
        class_weighting=train.class_weighting,
        num_workers=train.num_workers,
        seed=7,
        device=train.device,
        amp=train.amp,
        channels_last=train.channels_last,
        checkpoint_dir="runs/x",
        resume=True,
    )


def test_rows_of_a_split_read_the_same_images_as_indexing_the_array(tmp_path: Path) -> None:
    from tasks.data.dataset import Rows

    np.save(tmp_path / "images.npy", np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2))
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    idx = np.array([1, 4, 5])
    rows = Rows(images, idx)
    assert (len(rows), rows.shape, rows.dtype, rows.ndim) == (3, (3, 2, 2), np.uint8, 3)
    assert rows[1].tolist() == [[16, 17], [18, 19]]  # image 4
    assert np.array_equal(rows[1:], images[[4, 5]])
    assert np.array_equal(rows[np.array([2, 0])], images[[5, 1]])
    assert np.array_equal(np.asarray(rows), images[idx])
    assert np.asarray(rows, dtype=np.float32).dtype == np.float32


def test_training_datasets_read_the_memory_map_per_image_and_copy_no_split(tmp_path: Path) -> None:
    """Training memory stays flat against the set's size: its datasets hold rows of the
    memory-mapped images.npy, not ``images[train_idx]`` copies (benchmarks/results/scale.md)."""
    import pandas as pd

    from tasks.data.dataset import ProcessedDataset
    from tasks.training.strategies import _datasets

    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    splits = np.array(["train", "val", "train", "test", "val", "train", "train", "val"])
    dataset = ProcessedDataset(
        images=np.load(tmp_path / "images.npy", mmap_mode="r"),
        labels=np.array([0, 1, 0, 1, 0, 1, 0, 1]),
        splits=splits,
        classes=["a", "b"],
        manifest=pd.DataFrame({"split": splits}),
        info={},
        root=tmp_path,
    )
    config = load_params("params.yaml").train
    train_set, val_set = _datasets(config, dataset, dataset.indices("train"))
    assert train_set.images.array is dataset.images is val_set.images.array
    assert (len(train_set), len(val_set)) == (4, 3)
    copied = ImageDataset(pixels[[1, 4, 7]], np.array([1, 0, 1]), to_tensor_transform(1))
    for index in range(3):
        assert torch.equal(val_set[index][0], copied[index][0])
        assert val_set[index][1] == copied[index][1]
