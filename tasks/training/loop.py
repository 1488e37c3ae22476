"""The training loop: ``train_one_epoch``, ``validation_metrics``
(:mod:`tasks.training.validation`), and ``fit`` around them.

In the manner of torchvision's classification reference: one readable loop, everything else
configuration. ``fit`` adds what a clinical team needs from it:

- a checkpoint after every epoch (``last.pt``) and ``resume`` that continues from it; each
  epoch's randomness (shuffling, augmentation, dropout) is seeded from ``seed + epoch``, so a
  resumed run ends with the same weights as an uninterrupted one;
- early stopping and model selection on the validation AUC;
- class-balanced loss weights for imbalanced labels;
- on a GPU: mixed precision (bf16 where supported, else fp16 with loss scaling); channels_last
  on a GPU and the CPU (the model is put back in the default memory format afterwards);
- augmentation of whole batches as tensors (:mod:`tasks.training.augment`), when given;
- under ``torchrun``: DistributedDataParallel with a DistributedSampler; rank 0 alone writes
  checkpoints and reports epochs.

No MLflow or Prefect here: the caller passes recorders (:mod:`tasks.training.recorders`),
which ``fit`` calls on rank 0 when it starts, after each epoch and when it ends.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from tasks import atomic
from tasks.model.label_kind import kind_of_labels, positive_weights
from tasks.model.predict import autocast_context
from tasks.training.augment import BatchAugment
from tasks.training.schedule import planned_epochs, warmup_cosine
from tasks.training.types import FitConfig, FitResult, TrainingRecorder
from tasks.training.validation import validation_metrics

CHECKPOINT_NAME = "last.pt"
# (model, images, labels) -> perturbed images; the adversarial-training hook.
Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` job (world of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun``."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(name)


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """``balanced``: weight_c = N / (n_classes * count_c); for findings ``(N, K)`` each
    finding's BCE ``pos_weight`` (negatives / positives,
    :func:`tasks.model.label_kind.positive_weights`); ``none``: no weights."""
    if mode == "none":
        return None
    if np.ndim(labels) == 2:
        return torch.from_numpy(positive_weights(labels))
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = len(labels) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler | None:
    """The loss scaler that fp16 autocast needs (see :func:`autocast_context`), else ``None``.

    bf16 has fp32's exponent range, so its gradients do not underflow and need no scaling.
    """
    if not enabled or device.type != "cuda" or torch.cuda.is_bf16_supported():
        return None
    return torch.amp.GradScaler("cuda")


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """One optimizer update from ``loss``, through the fp16 loss scaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    perturb: Perturb | None = None,
    augment: BatchAugment | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"train_loss", "images_per_s"}``.

    ``scaler``: the fit's fp16 loss scaler from :func:`grad_scaler` (``None`` for bf16/fp32).
    ``augment``: applied to each ``(B, C, S, S)`` batch on ``device`` (the loader's images
    are then plain pixels).
    """
    model.train()
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if perturb is not None:
            images = perturb(model, images, labels)
            model.train()
        with autocast_context(device, amp):
            loss = criterion(model(images), labels)
        backward_and_step(loss, optimizer, scaler)
        scheduler.step()
        total_loss += float(loss.detach()) * len(labels)
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "images_per_s": seen / max(seconds, 1e-9)}


@dataclass
class _Trainer:
    """What one fit trains with, built once by :func:`_build_trainer` and shared by its steps."""

    model: nn.Module  # unwrapped: checkpoints and validation use it
    net: nn.Module  # what training batches go through (DDP-wrapped under torchrun)
    device: torch.device
    channels_last: bool
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    augment: BatchAugment | None


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train_set: Dataset,
    val_set: Dataset,
    train_labels: np.ndarray,
    n_classes: int,
    config: FitConfig,
    recorders: Sequence[TrainingRecorder] = (),
    perturb: Perturb | None = None,
    augment: BatchAugment | None = None,
) -> FitResult:
    """Train ``model`` and return the weights of its best validation epoch.

    Args:
        model: the student; its trainable parameters are those in ``param_groups``.
        param_groups: optimizer groups (each with its own ``lr``).
        train_set, val_set: datasets of ``(image, label)``; ``train_set`` may augment.
        train_labels: labels of ``train_set`` (for class weights).
        n_classes: number of classes.
        config: loop settings.
        recorders: told, on rank 0 only, when the fit starts, after each epoch (once its
            checkpoint is written) and when it ends; see :class:`TrainingRecorder`.
        perturb: optional adversarial-training hook applied to every training batch.
        augment: optional augmentation of every training batch as a tensor
            (:mod:`tasks.training.augment`), reseeded each epoch; ``train_set`` then
            should not augment its images itself.
    """
    env = dist_env()
    device = _setup_device(config.device, env)
    trainer = _build_trainer(
        model, param_groups, train_set, val_set, train_labels, n_classes, config, env, device
    )
    trainer.augment = augment if augment is not None and augment.active else None
    epochs = planned_epochs(config, len(trainer.train_loader))
    result = FitResult(
        best_state=_cpu_state(model), best_epoch=0, best_val_auc=-math.inf, device=str(device)
    )
    checkpoint_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
    start_epoch = _resume(checkpoint_path, trainer, result) if config.resume else 0
    # Other ranks train the same epochs in lockstep; one voice is enough.
    reporting = list(recorders) if env.is_main else []
    for recorder in reporting:
        recorder.fit_started(epochs, start_epoch, len(train_set))

    epochs_without_gain = sum(1 for row in result.history if row["epoch"] > result.best_epoch)
    for epoch in range(start_epoch, epochs):
        if epochs_without_gain >= config.patience:
            result.stopped_early = True
            break
        improved = _epoch_and_checkpoint(
            trainer, epoch, config, train_set, perturb, result, checkpoint_path, reporting, env
        )
        epochs_without_gain = 0 if improved else epochs_without_gain + 1
    if trainer.channels_last:  # callers (saving, serving, attacks) get the default layout back
        model.to(memory_format=torch.contiguous_format)
    for recorder in reporting:
        recorder.fit_ended(result)
    return result


def _epoch_and_checkpoint(
    trainer: _Trainer,
    epoch: int,
    config: FitConfig,
    train_set: Dataset,
    perturb: Perturb | None,
    result: FitResult,
    checkpoint_path: Path,
    reporting: Sequence[TrainingRecorder],
    env: DistEnv,
) -> bool:
    """One epoch (0-based ``epoch``): train and validate, add its row to ``result`` (keeping
    the weights when it beats the best), checkpoint and tell ``reporting`` on rank 0, then wait
    for the other ranks; returns whether the epoch improved on the best validation AUC."""
    row = _run_epoch(trainer, epoch, config, train_set, perturb)
    result.history.append(row)
    improved = _select_if_better(result, row, trainer.model)
    if env.is_main:
        _save_checkpoint(checkpoint_path, epoch, trainer, result)
        for recorder in reporting:
            recorder.epoch_ended(row)
    if env.distributed:
        dist.barrier()
    return improved


def _setup_device(name: str, env: DistEnv) -> torch.device:
    """Join the ``torchrun`` process group if there is one; returns this rank's device."""
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(name, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _build_trainer(
    model: nn.Module,
    param_groups: list[dict],
    train_set: Dataset,
    val_set: Dataset,
    train_labels: np.ndarray,
    n_classes: int,
    config: FitConfig,
    env: DistEnv,
    device: torch.device,
) -> _Trainer:
    """Model on its device, loaders, loss, optimizer, schedule and loss scaler for one fit."""
    # channels_last on the CPU too: oneDNN's convolutions run faster in it (benchmarks/results/
    # train-speed.md), as they made the attacks (benchmarks/results/robustness-cpu.md).
    channels_last = config.channels_last
    net = _place_model(model, device, channels_last, env)
    sampler, train_loader, val_loader = _build_loaders(train_set, val_set, config, env, device)
    weights = class_weights(train_labels, n_classes, config.class_weighting)
    kind = kind_of_labels(train_labels)  # (N, K) findings: sigmoid per finding, BCE
    criterion = kind.loss(weights.to(device) if weights is not None else None)
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config, max(1, len(train_loader)))
    return _Trainer(
        model=model,
        net=net,
        device=device,
        channels_last=channels_last,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        criterion=criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        # One scaler for the whole fit: its scale adapts over the batches and is checkpointed.
        scaler=grad_scaler(device, config.amp),
        augment=None,
    )


def _place_model(
    model: nn.Module, device: torch.device, channels_last: bool, env: DistEnv
) -> nn.Module:
    """Move ``model`` to ``device`` (in place); returns what to train: it, or its DDP wrapper."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if not env.distributed:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _build_loaders(
    train_set: Dataset, val_set: Dataset, config: FitConfig, env: DistEnv, device: torch.device
) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    """The training sampler (this rank's seeded share, reshuffled by ``set_epoch``) and the
    training and validation loaders."""
    sampler = DistributedSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed
    )
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        # A last batch of one or two images makes a noisy step (and breaks BatchNorm at one).
        drop_last=len(train_set) > config.batch_size * env.world_size,
        worker_init_fn=_seed_worker,
        persistent_workers=config.num_workers > 0,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=config.batch_size * 2,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    return sampler, train_loader, val_loader


def _resume(checkpoint_path: Path, trainer: _Trainer, result: FitResult) -> int:
    """Restore ``trainer`` and ``result`` from the checkpoint if there is one; returns the
    epoch to start with (0 without a checkpoint)."""
    if not checkpoint_path.is_file():
        return 0
    start_epoch = _load_checkpoint(checkpoint_path, trainer, result)
    result.resumed_from_epoch = start_epoch  # the last finished epoch's number (1-based)
    return start_epoch


def _run_epoch(
    trainer: _Trainer, epoch: int, config: FitConfig, train_set: Dataset, perturb: Perturb | None
) -> dict[str, float]:
    """Train one epoch and validate; returns the epoch's row (see ``TrainingRecorder``)."""
    _seed_epoch(config.seed, epoch, train_set, trainer.augment)
    trainer.sampler.set_epoch(epoch)
    epoch_start = time.perf_counter()
    # Epochs are counted from 1 in every output (logs, reports, MLflow's steps and
    # best_epoch, plots): the loop's 0-based index becomes a number here, once.
    row: dict[str, float] = {"epoch": epoch + 1}
    row.update(
        train_one_epoch(
            trainer.net,
            trainer.train_loader,
            trainer.criterion,
            trainer.optimizer,
            trainer.scheduler,
            trainer.device,
            config.amp,
            trainer.channels_last,
            trainer.scaler,
            perturb,
            trainer.augment,
        )
    )
    row.update(
        validation_metrics(
            trainer.model,
            trainer.val_loader,
            trainer.device,
            config.amp,
            trainer.channels_last,
            isinstance(trainer.criterion, nn.BCEWithLogitsLoss),
        )
    )
    row["lr"] = trainer.optimizer.param_groups[-1]["lr"]
    row["seconds"] = time.perf_counter() - epoch_start
    return row


def _select_if_better(result: FitResult, row: dict[str, float], model: nn.Module) -> bool:
    """Model selection: keep ``model``'s weights in ``result`` if ``row`` beats the best so far;
    returns whether it did."""
    # NaN AUC (one class in val) falls back to the negative validation loss.
    score = row["val_auc"] if not math.isnan(row["val_auc"]) else -row["val_loss"]
    if score <= result.best_val_auc:
        return False
    result.best_val_auc, result.best_epoch = score, int(row["epoch"])
    result.best_state = _cpu_state(model)
    return True


def _seed_epoch(
    seed: int, epoch: int, dataset: Dataset, augment: BatchAugment | None = None
) -> None:
    """Seed dropout and augmentation (the dataset's per-image transform, or the batches'
    ``augment``) from (seed, epoch) so a resumed epoch replays exactly."""
    torch.manual_seed(seed * 1000 + epoch)
    if augment is not None:
        augment.seed(seed * 1000 + epoch)
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed * 1000 + epoch)


def _seed_worker(worker_id: int) -> None:
    # Each DataLoader worker re-seeds its copy of the transforms from torch's per-worker seed.
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(torch.initial_seed() % 2**32)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state dict (later steps must not change it), in the
    default memory format whatever the model trains in."""
    return {
        k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
    }


def _save_checkpoint(path: Path, epoch: int, trainer: _Trainer, result: FitResult) -> None:
    """Write ``last.pt`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch + 1,  # the number of the epoch just finished (1-based)
        "model": _cpu_state(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "best_state": result.best_state,
        "best_epoch": result.best_epoch,
        "best_val_auc": result.best_val_auc,
        "history": result.history,
    }
    atomic.write_file(path, lambda partial: torch.save(state, partial))


def _load_checkpoint(path: Path, trainer: _Trainer, result: FitResult) -> int:
    """Restore ``trainer`` and ``result`` from ``last.pt``; returns the epoch to continue with."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    result.best_state = state["best_state"]
    result.best_epoch = state["best_epoch"]
    result.best_val_auc = state["best_val_auc"]
    result.history = list(state["history"])
    return int(state["epoch"])  # epochs done: the 0-based index of the next one
