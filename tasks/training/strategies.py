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
from tasks.model.transforms import ImageDataset, to_tensor_transform
from tasks.training.adversarial import ADVERSARIAL_SUFFIX, pgd_perturbation, split_variant
from tasks.training.augment import BatchAugment
from tasks.training.features import HeadOnly, ProbeFit, feature_datasets, fit_probe_on_validation
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
    if dataset.multilabel and any(
        is_adversarial(s, config) for s in (config.strategy, *(config.compare or ()))
    ):
        raise MedtransferError(
            "Adversarial training (+pgd, train.adversarial) is not yet supported for multi-label "
            "datasets; train without it."
        )
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
    """A seeded, label-stratified share of ``indices`` (at least 2 per class), sorted; for
    findings ``(N, K)`` (no one class to stratify by) a seeded share of at least 2 images."""
    if fraction >= 1.0:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    if np.ndim(labels) == 2:
        count = min(len(indices), max(2, round(len(indices) * fraction)))
        return np.sort(rng.permutation(indices)[:count])
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
    lp_stage = None
    if base_strategy == "lp_ft":
        lp_stage = asdict(_fit_head_first(model, features, len(dataset.classes), train_params))
    if cached:
        return _fit_head_only(model, features, labels, len(dataset.classes), fit_config, recorders)
    groups = param_groups(
        model, _base_lr(train_params, base_strategy), train_params.backbone_lr_factor
    )
    sets = _datasets(train_params, dataset, train_idx)
    augment = BatchAugment(train_params.augment, dataset.image_size, dataset.channels)
    n_classes = len(dataset.classes)
    result = fit(model, groups, *sets, labels, n_classes, fit_config, recorders, perturb, augment)
    model.load_state_dict(result.best_state)
    result.lp_stage = lp_stage
    return result


def _base_lr(config: TrainParams, strategy: str) -> float:
    """The head's learning rate (the backbone's follow from it): ``lp_ft`` fine-tunes from a
    fitted head at ``lr * backbone_lr_factor``, the small rate of Kumar et al. 2022's FT
    stage. At the full ``lr`` AdamW's first steps after the LP stage raised the batch loss from
    2.4 to 10.1 on the synthetic default at 64 px (benchmarks/results/lp-ft-start.md)."""
    return config.lr * config.backbone_lr_factor if strategy == "lp_ft" else config.lr


def _fit_head_first(
    model: nn.Module, features: tuple, n_classes: int, config: TrainParams
) -> ProbeFit:
    """LP-FT's LP stage: the head fitted to the frozen features (the ``(features, label)``
    training and validation datasets), an L2-regularised logistic regression whose strength
    is chosen on validation (Kumar et al. 2022)."""
    (train_x, train_y), (val_x, val_y) = (dataset.tensors for dataset in features)
    weights = class_weights(train_y.numpy(), n_classes, config.class_weighting)
    fit = fit_probe_on_validation(
        model.head, (train_x, train_y.numpy()), (val_x, val_y.numpy()), weights
    )
    logger.info(
        "LP-FT: head fitted to the frozen features (L2 %g chosen on validation: training loss "
        "%.4f, validation loss %.4f), now fine-tuning",
        fit.l2, fit.train_loss, fit.val_loss,
    )  # fmt: skip
    return fit


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
    """The training set of ``train_idx`` (sorted) and the validation set, both plain pixels:
    training augments whole batches instead (:class:`BatchAugment`: about a sixth of the
    per-image MONAI chain's time an image on 2 CPU cores, benchmarks/results/train-speed.md)."""
    # Rows of the memory map, read per item: the training and validation images are never all
    # in memory, so the process's memory stays flat against the set's size.
    plain = to_tensor_transform(dataset.channels)
    train_set = ImageDataset(Rows(dataset.images, train_idx), dataset.labels[train_idx], plain)
    val_images, val_labels = dataset.rows("val")
    return train_set, ImageDataset(val_images, val_labels, plain)


def _perturbation(config: TrainParams) -> Perturb:
    """The PGD training hook at ``adversarial_eps_255`` / 255 (pixels are in [0, 1])."""
    return pgd_perturbation(config.adversarial_eps_255 / 255.0, config.adversarial_steps)


def student_spec(
    config: TrainParams,
    strategy: str,
    dataset: ProcessedDataset,
    teacher_sha256: str,
    temperature: float | tuple[float, ...],
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
        label_kind=dataset.label_kind,
    )
