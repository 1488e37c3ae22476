"""The transfer strategies: the student network for each, its checks, and :func:`fit_student`,
the single hop from the train stage into training.

``linear_probe`` (frozen backbone, new head), ``partial`` (the last ``unfreeze_blocks`` blocks
train), ``full`` (everything, the backbone at ``backbone_lr_factor`` of the head's rate),
``lp_ft`` (the head fitted to frozen features first, then everything fine-tuned) and
``scratch`` (the same network from random weights: the control that shows what transfer buys),
each optionally with ``+pgd`` for PGD adversarial training.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from tasks.config import TrainParams
from tasks.data.dataset import ProcessedDataset, Rows
from tasks.errors import MedtransferError
from tasks.model.student import STRATEGIES, build_student, check_image_size, param_groups
from tasks.model.student_io import StudentSpec
from tasks.model.teachers import resolve_weights
from tasks.model.transforms import ImageDataset, to_tensor_transform, train_transform
from tasks.training.adversarial import ADVERSARIAL_SUFFIX, pgd_perturbation, split_variant
from tasks.training.features import HeadOnly, feature_datasets, fit_linear_head
from tasks.training.loop import Perturb, class_weights, dist_env, fit, resolve_device
from tasks.training.types import FitConfig, FitResult, TrainingRecorder

logger = logging.getLogger(__name__)


def validate(config: TrainParams, dataset: ProcessedDataset) -> None:
    """Every configuration error, raised before any training starts."""
    for strategy in (config.strategy, *(config.compare or ())):
        if split_variant(strategy)[0] not in STRATEGIES:
            raise MedtransferError(
                f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}, each optionally "
                f"with {ADVERSARIAL_SUFFIX} for PGD adversarial training."
            )
    check_image_size(config.teacher, dataset.image_size)
    check_device(config.device)
    # Building the network checks the teacher name and unfreeze_blocks; resolving its weights
    # file that it exists (and its hash, when bundled), unless only the scratch control trains.
    build_student(
        config.teacher,
        split_variant(config.strategy)[0],
        num_classes=len(dataset.classes),
        unfreeze_blocks=config.unfreeze_blocks,
        pretrained=False,
        channels=dataset.channels,
    )
    if any(split_variant(s)[0] != "scratch" for s in (config.strategy, *(config.compare or ()))):
        resolve_weights(config.teacher, config.weights_path)
    if len(dataset.indices("train")) == 0 or len(dataset.indices("val")) == 0:
        raise MedtransferError(
            "The processed dataset has an empty train or val split; ingest more data."
        )


def check_device(device: str) -> None:
    """Refuse a CUDA device this host does not have, before anything is written: torch would
    fail only when the model moves, after the MLflow run and the student folder were touched."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise MedtransferError(
            f"train.device={device} but CUDA is not available on this host (torch "
            f"{torch.__version__}); use train.device=auto or cpu."
        )
    index = device.partition(":")[2]
    count = torch.cuda.device_count()
    if index and (not index.isdigit() or int(index) >= count):
        raise MedtransferError(
            f"train.device={device} but this host has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; use train.device=auto, cuda or cuda:N."
        )


def is_adversarial(strategy: str, config: TrainParams) -> bool:
    """Whether ``strategy`` trains adversarially: its ``+pgd`` variant, or ``train.adversarial``."""
    return split_variant(strategy)[1] or config.adversarial == "pgd"


def build_model(
    config: TrainParams, strategy: str, num_classes: int, channels: int = 1
) -> nn.Module:
    """The student network for ``strategy`` (``+pgd`` ignored) on ``channels`` input
    channels, teacher weights loaded unless it is the scratch control."""
    base_strategy = split_variant(strategy)[0]
    return build_student(
        config.teacher,
        base_strategy,
        num_classes=num_classes,
        unfreeze_blocks=config.unfreeze_blocks,
        pretrained=base_strategy != "scratch",
        weights_path=config.weights_path,
        dropout=config.dropout,
        channels=channels,
    )


def label_subset(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, label-stratified share of ``indices`` (at least 2 per class), sorted."""
    if fraction >= 1.0:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        count = max(2, round(len(members) * fraction))
        chosen.append(rng.permutation(members)[: min(count, len(members))])
    return np.sort(np.concatenate(chosen))


def fit_student(
    model: nn.Module,
    dataset: ProcessedDataset,
    train_params: TrainParams,
    fit_config: FitConfig,
    recorders: list[TrainingRecorder],
    *,
    strategy: str,
    train_idx: np.ndarray,
) -> FitResult:
    """Fit ``model`` (built by :func:`build_model` for ``strategy``) on the training images
    ``train_idx`` of ``dataset`` and load its selected weights into it.

    A frozen trunk that sees no augmentation (``linear_probe`` with every ``train.augment``
    value off, no adversarial training) trains its head on features computed once
    (:mod:`tasks.training.features`); ``lp_ft`` first fits the head to the frozen features
    (the LP stage), then fine-tunes everything.
    """
    base_strategy = split_variant(strategy)[0]
    perturb = _perturbation(train_params) if is_adversarial(strategy, train_params) else None
    train_idx = np.sort(train_idx)
    labels = dataset.labels[train_idx]
    cached = (
        base_strategy == "linear_probe"
        and not _augments(train_params, dataset.channels)
        and perturb is None
    )
    if cached or base_strategy == "lp_ft":
        device = resolve_device(fit_config.device, dist_env())
        train = (Rows(dataset.images, train_idx), labels)
        features = feature_datasets(model.to(device), train, dataset.rows("val"), device)
    if base_strategy == "lp_ft":
        _fit_head_first(model, features[0].tensors[0], labels, len(dataset.classes), train_params)
    if cached:
        return _fit_head_only(model, features, labels, len(dataset.classes), fit_config, recorders)
    groups = param_groups(model, train_params.lr, train_params.backbone_lr_factor)
    sets = _datasets(train_params, dataset, train_idx)
    result = fit(model, groups, *sets, labels, len(dataset.classes), fit_config, recorders, perturb)
    model.load_state_dict(result.best_state)
    return result


def _fit_head_first(
    model: nn.Module,
    features: torch.Tensor,
    labels: np.ndarray,
    n_classes: int,
    config: TrainParams,
) -> None:
    """LP-FT's LP stage: the head fitted to the frozen ``(N, D)`` features."""
    weights = class_weights(labels, n_classes, config.class_weighting)
    loss = fit_linear_head(model.head, features, labels, weights, config.weight_decay)
    logger.info("LP-FT: head fitted to the frozen features (loss %.4f), now fine-tuning", loss)


def _fit_head_only(
    model: nn.Module,
    features: tuple,
    labels: np.ndarray,
    n_classes: int,
    fit_config: FitConfig,
    recorders: list[TrainingRecorder],
) -> FitResult:
    """A linear probe trained on features computed once: the loop sees the head alone."""
    head = HeadOnly(model)
    groups = [{"name": "head", "params": list(head.head.parameters()), "lr": fit_config.lr}]
    loop = replace(fit_config, channels_last=False)  # (B, D) features have no memory format
    result = fit(head, groups, *features, labels, n_classes, loop, recorders)
    head.load_state_dict(result.best_state)
    return result


def _augments(config: TrainParams, channels: int) -> bool:
    """Whether any ``train.augment`` transform is on for images of ``channels`` (the colour
    jitter never is for gray)."""
    values = asdict(config.augment)
    if channels == 1:
        values.pop("colour_jitter")
    return any(bool(value) for value in values.values())


def _datasets(
    config: TrainParams, dataset: ProcessedDataset, train_idx: np.ndarray
) -> tuple[ImageDataset, ImageDataset]:
    """The augmented training set of ``train_idx`` (sorted) and the plain validation set."""
    # Rows of the memory map, read per item: the training and validation images are never all
    # in memory, so the process's memory stays flat against the set's size.
    train_set = ImageDataset(
        Rows(dataset.images, train_idx),
        dataset.labels[train_idx],
        train_transform(config.augment, dataset.image_size, dataset.channels),
    )
    val_images, val_labels = dataset.rows("val")
    return train_set, ImageDataset(val_images, val_labels, to_tensor_transform(dataset.channels))


def _perturbation(config: TrainParams) -> Perturb:
    """The PGD training hook at ``adversarial_eps_255`` / 255 (pixels are in [0, 1])."""
    return pgd_perturbation(config.adversarial_eps_255 / 255.0, config.adversarial_steps)


def student_spec(
    config: TrainParams,
    strategy: str,
    dataset: ProcessedDataset,
    teacher_sha256: str,
    temperature: float,
) -> StudentSpec:
    """What ``save_student`` writes beside the weights, to rebuild the network for serving."""
    return StudentSpec(
        teacher=config.teacher,
        strategy=split_variant(strategy)[0],
        unfreeze_blocks=config.unfreeze_blocks,
        num_classes=len(dataset.classes),
        dropout=config.dropout,
        image_size=dataset.image_size,
        classes=tuple(dataset.classes),
        teacher_weights_sha256=teacher_sha256,
        temperature=temperature,
        channels=dataset.channels,
    )
