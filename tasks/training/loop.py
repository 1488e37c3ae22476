"""The training loop: ``train_one_epoch``, ``predict``, and ``fit`` around them.

In the manner of torchvision's classification reference: one readable loop, everything else
configuration. ``fit`` adds what a clinical team needs from it:

- a checkpoint after every epoch (``last.pt``) and ``resume`` that continues from it; each
  epoch's randomness (shuffling, augmentation, dropout) is seeded from ``seed + epoch``, so a
  resumed run ends with the same weights as an uninterrupted one;
- early stopping and model selection on the validation AUC;
- class-balanced loss weights for imbalanced labels;
- on a GPU: mixed precision (bf16 where supported, else fp16 with loss scaling) and
  channels_last;
- under ``torchrun``: DistributedDataParallel with a DistributedSampler; rank 0 alone writes
  checkpoints and reports epochs.

No MLflow or Prefect here: the caller passes ``on_epoch`` to log.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from tasks.evaluation.metrics import roc_auc

CHECKPOINT_NAME = "last.pt"
# (model, images, labels) -> perturbed images; the adversarial-training hook.
Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FitConfig:
    """How to train (the loop-related keys of ``train`` in params.yaml)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 3
    class_weighting: str = "balanced"
    num_workers: int = 0
    seed: int = 42
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    checkpoint_dir: str = "models/checkpoints"
    resume: bool = False


@dataclass
class FitResult:
    """What ``fit`` returns: the selected weights and the history that chose them."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_auc: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    device: str = "cpu"


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
    """``balanced``: weight_c = N / (n_classes * count_c); ``none``: no weights."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = len(labels) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it, fp16 on older ones, nothing on the CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


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
) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"train_loss", "images_per_s"}``."""
    model.train()
    total_loss, seen = 0.0, 0
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if perturb is not None:
            images = perturb(model, images, labels)
            model.train()
        autocast, _ = autocast_context(device, amp)
        with autocast:
            loss = criterion(model(images), labels)
        backward_and_step(loss, optimizer, scaler)
        scheduler.step()
        total_loss += float(loss.detach()) * len(labels)
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "images_per_s": seen / max(seconds, 1e-9)}


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = True,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(N, C)`` and labels ``(N,)`` over ``loader``, in eval mode."""
    model.eval()
    probabilities, labels = [], []
    for images, batch_labels in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast, _ = autocast_context(device, amp)
        with autocast:
            logits = model(images)
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(probabilities), np.concatenate(labels)


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train_set: Dataset,
    val_set: Dataset,
    train_labels: np.ndarray,
    n_classes: int,
    config: FitConfig,
    on_epoch: Callable[[dict], None] | None = None,
    perturb: Perturb | None = None,
) -> FitResult:
    """Train ``model`` and return the weights of its best validation epoch.

    Args:
        model: the student; its trainable parameters are those in ``param_groups``.
        param_groups: optimizer groups (each with its own ``lr``).
        train_set, val_set: datasets of ``(image, label)``; ``train_set`` may augment.
        train_labels: labels of ``train_set`` (for class weights).
        n_classes: number of classes.
        config: loop settings.
        on_epoch: called on rank 0 after each epoch with that epoch's metrics.
        perturb: optional adversarial-training hook applied to every training batch.
    """
    env = dist_env()
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    device = resolve_device(config.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_channels_last = config.channels_last and device.type == "cuda"
    model.to(device)
    if use_channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if env.distributed
        else model
    )

    sampler = DistributedSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed
    )
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
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

    weights = class_weights(train_labels, n_classes, config.class_weighting)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(config, steps_per_epoch)
    )
    _, scaler = autocast_context(device, config.amp)

    result = FitResult(
        best_state=_cpu_state(model), best_epoch=-1, best_val_auc=-math.inf, device=str(device)
    )
    start_epoch = 0
    checkpoint_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
    if config.resume and checkpoint_path.is_file():
        start_epoch = _load_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, result)
        result.resumed_from_epoch = start_epoch - 1

    epochs_without_gain = sum(1 for row in result.history if row["epoch"] > result.best_epoch)
    for epoch in range(start_epoch, config.epochs):
        if epochs_without_gain >= config.patience:
            result.stopped_early = True
            break
        _seed_epoch(config.seed, epoch, train_set)
        sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        row = {"epoch": epoch}
        row.update(
            train_one_epoch(
                net,
                train_loader,
                criterion,
                optimizer,
                scheduler,
                device,
                config.amp,
                use_channels_last,
                scaler,
                perturb,
            )
        )
        probabilities, labels = predict(model, val_loader, device, config.amp, use_channels_last)
        row["val_loss"] = float(
            nn.functional.nll_loss(
                torch.log(torch.from_numpy(probabilities).clamp_min(1e-8)), torch.from_numpy(labels)
            )
        )
        row["val_auc"] = roc_auc(labels, probabilities)
        row["val_accuracy"] = float((probabilities.argmax(1) == labels).mean())
        row["lr"] = optimizer.param_groups[-1]["lr"]
        row["seconds"] = time.perf_counter() - epoch_start
        result.history.append(row)

        # NaN AUC (one class in val) falls back to the negative validation loss.
        score = row["val_auc"] if not math.isnan(row["val_auc"]) else -row["val_loss"]
        if score > result.best_val_auc:
            result.best_val_auc, result.best_epoch = score, epoch
            result.best_state = _cpu_state(model)
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        if env.is_main:
            _save_checkpoint(checkpoint_path, epoch, model, optimizer, scheduler, scaler, result)
            if on_epoch is not None:
                on_epoch(row)
        if env.distributed:
            dist.barrier()
    return result


def _warmup_cosine(config: FitConfig, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _seed_epoch(seed: int, epoch: int, dataset: Dataset) -> None:
    """Seed dropout and augmentation from (seed, epoch) so a resumed epoch replays exactly."""
    torch.manual_seed(seed * 1000 + epoch)
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
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(
    path: Path, epoch: int, model, optimizer, scheduler, scaler, result: FitResult
) -> None:
    """Write ``last.pt`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_state": result.best_state,
        "best_epoch": result.best_epoch,
        "best_val_auc": result.best_val_auc,
        "history": result.history,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, optimizer, scheduler, scaler, result: FitResult) -> int:
    """Restore everything from ``last.pt``; returns the epoch to continue with."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    result.best_state = state["best_state"]
    result.best_epoch = state["best_epoch"]
    result.best_val_auc = state["best_val_auc"]
    result.history = list(state["history"])
    return int(state["epoch"]) + 1
