"""The student: an ImageNet teacher adapted to medical images, and its transfer strategy.

A :class:`Student` takes ``(B, C, H, W)`` float images in pixel space [0, 1] (C = 1 gray, or 3
colour: then the teacher's three-channel stem is used as it was trained) and returns class
logits ``(B, num_classes)``. It normalises its input itself (exactly once, the teacher's way),
so every caller (training, evaluation, attacks, the BentoML service) feeds plain [0, 1] pixels.

Strategies (:data:`STRATEGIES`), from least to most adapted:

- ``linear_probe``: the whole backbone is frozen, BatchNorm statistics included; only the new
  linear head trains.
- ``partial``: the last ``unfreeze_blocks`` blocks and the backbone's top (final 1x1 conv + BN)
  train; the earlier blocks and the stem stay frozen, BatchNorm statistics included.
- ``full``: everything trains; :func:`param_groups` gives earlier layers smaller learning rates.
- ``lp_ft``: ``full``, but the head first fits the frozen features (a linear probe, the train
  stage's LP stage) before everything fine-tunes: a fitted head disturbs the pretrained
  features less than a random one (Kumar et al., ICLR 2022: better out of distribution).
- ``scratch``: the same network, randomly initialised, everything trains at one learning rate:
  the control that shows what the ImageNet weights buy.

Also here: :func:`teacher_feature_extractor` (the pristine teacher's features, for the
teacher-transfer attack, never sharing a tensor with a student), :func:`imagenet_classifier`
(the full 1000-class teacher, for the sanity check) and :func:`check_image_size`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model.teachers import (
    Backbone,
    Normalisation,
    Normalise,
    TeacherSpec,
    build_teacher,
    get_teacher,
)

STRATEGIES = ("linear_probe", "partial", "full", "scratch", "lp_ft")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def check_image_size(teacher: str | TeacherSpec, size: int | tuple[int, int]) -> None:
    """Refuse an input size the teacher cannot take as it was trained.

    For EfficientNet the rule is: height and width multiples of 32, at least 32. Smaller
    inputs fail inside the network; other sizes run but pad some stride-2 layers differently
    from the TF "same" padding the weights were trained with (different features, silently).

    Args:
        teacher: teacher name or spec.
        size: side of a square image, or ``(height, width)``.

    Raises:
        MedtransferError: saying which sizes would do.
    """
    spec = get_teacher(teacher)
    sides = tuple(size) if isinstance(size, tuple | list) else (size, size)
    for side in sides:
        if isinstance(side, bool) or not isinstance(side, int) or not _size_ok(spec, side):
            raise MedtransferError(_size_message(spec, sides))


def _size_ok(spec: TeacherSpec, side: int) -> bool:
    return side >= spec.min_image_size and side % spec.size_multiple == 0


def _size_message(spec: TeacherSpec, sides: tuple) -> str:
    m = spec.size_multiple
    # The allowed sizes just below and just above each requested side.
    nearest = sorted(
        {max(spec.min_image_size, (s // m) * m) for s in sides if isinstance(s, int)}
        | {max(spec.min_image_size, -(-s // m) * m) for s in sides if isinstance(s, int)}
    )
    hint = f" Nearest sizes: {', '.join(map(str, nearest))}." if nearest else ""
    return (
        f"Image size {'x'.join(map(str, sides))} does not suit teacher {spec.name!r}: height "
        f"and width must be integer multiples of {m} and at least {spec.min_image_size} (the "
        f"network downsamples by {m}).{hint} Set data.image_size accordingly and re-run ingest."
    )


def check_input(
    x: torch.Tensor, spec_name: str, channels: int, multiple: int, minimum: int
) -> None:
    """Shape check run on every forward pass: cheap, and far clearer than a conv error."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise MedtransferError(
            f"Teacher {spec_name!r} here expects images shaped (batch, {channels}, height, "
            f"width), got {tuple(x.shape)}."
        )
    height, width = x.shape[-2:]
    if height < minimum or width < minimum or height % multiple or width % multiple:
        raise MedtransferError(
            f"Image size {height}x{width} does not suit teacher {spec_name!r}: height and width "
            f"must be multiples of {multiple} and at least {minimum}."
        )


# --------------------------------------------------------------------------------------------
# Grayscale in, 3-channel teacher inside
# --------------------------------------------------------------------------------------------


class GrayscaleInput(nn.Module):
    """``(B, 1, H, W)`` pixels in [0, 1] → the teacher's normalised input.

    With a channel-uniform normalisation (``fold=True``) the output has one channel and the
    stem conv's weights are summed over colour (:func:`fold_stem_to_grayscale`): the same
    result as repeating gray three times, at a third of the stem's cost. Otherwise the gray
    channel is repeated and each copy normalised with its own coefficients.
    """

    def __init__(self, normalisation: Normalisation, fold: bool) -> None:
        super().__init__()
        self.fold = fold
        self.channels = len(normalisation.scale)
        self.normalise = Normalise(normalisation, channels=1 if fold else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold:
            x = x.expand(-1, self.channels, -1, -1)
        return self.normalise(x)


class ColourInput(nn.Module):
    """``(B, 3, H, W)`` RGB pixels in [0, 1] → the teacher's normalised input, each channel
    with its own coefficients: the teacher's stem takes it exactly as it was trained."""

    def __init__(self, normalisation: Normalisation) -> None:
        super().__init__()
        self.channels = len(normalisation.scale)
        self.normalise = Normalise(normalisation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(x)


def fold_stem_to_grayscale(backbone: Backbone) -> None:
    """Replace the first conv of ``backbone.stem`` by a 1-channel conv with summed weights.

    For a conv ``w`` over 3 identical channels ``g``: ``sum_c w[:, c] * g = (sum_c w[:, c]) * g``,
    so the ImageNet weights are kept exactly (zero padding included, as 0 sums to 0).
    """
    name, conv = next((n, m) for n, m in backbone.stem.named_modules() if isinstance(m, nn.Conv2d))
    if conv.groups != 1:
        raise ValueError("cannot fold a grouped stem convolution")
    gray = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            gray.bias.copy_(conv.bias)
    parent_name, _, child = name.rpartition(".")
    parent = backbone.stem.get_submodule(parent_name) if parent_name else backbone.stem
    setattr(parent, child, gray)


def input_and_backbone(
    spec: TeacherSpec, pretrained: bool, weights_path: str | Path | None, channels: int
) -> tuple[nn.Module, Backbone, str | None]:
    """The teacher's backbone fed by an input layer for ``channels`` (1: gray, folded as
    below; 3: colour, the stem untouched), plus the loaded weights' hash."""
    if channels == 1:
        return _grayscale_backbone(spec, pretrained, weights_path)
    if channels != len(spec.normalisation.scale):
        raise MedtransferError(
            f"Teacher {spec.name!r} takes 1 (gray) or {len(spec.normalisation.scale)} "
            f"(colour) channels, not {channels}."
        )
    built = build_teacher(spec, pretrained=pretrained, weights_path=weights_path)
    sha256 = built.weights.sha256 if built.weights else None
    return ColourInput(spec.normalisation), built.backbone, sha256


def _grayscale_backbone(
    spec: TeacherSpec, pretrained: bool, weights_path: str | Path | None
) -> tuple[GrayscaleInput, Backbone, str | None]:
    """The teacher's backbone fed by a grayscale input layer, plus the loaded weights' hash."""
    fold = spec.normalisation.channel_uniform
    if pretrained:
        built = build_teacher(spec, pretrained=True, weights_path=weights_path)
        if fold:
            fold_stem_to_grayscale(built.backbone)
        sha256 = built.weights.sha256 if built.weights else None
    else:
        # A random stem is built with one input channel directly: summing three random
        # channels would triple its initial variance.
        built = build_teacher(spec, pretrained=False, in_channels=1 if fold else 3)
        sha256 = None
    return GrayscaleInput(spec.normalisation, fold=fold), built.backbone, sha256


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------


class Student(nn.Module):
    """Teacher backbone + dropout + new linear head, with a transfer strategy's freezing.

    Input: ``(B, C, H, W)`` float in [0, 1], C = ``channels`` (1 gray, 3 colour; H, W as
    :func:`check_image_size` allows).
    Output: logits ``(B, num_classes)``; :meth:`features` gives the pooled backbone features
    ``(B, feature_dim)``. Frozen parts stay in eval mode whatever ``train()`` is called with,
    so their BatchNorm statistics and stochastic depth never change. Build with
    :func:`build_student`.

    Attributes worth logging: ``teacher``, ``strategy``, ``unfreeze_blocks``, ``num_classes``,
    ``channels``, ``weights_sha256`` (None when not pretrained).
    """

    def __init__(
        self,
        *,
        spec: TeacherSpec,
        strategy: str,
        input_layer: nn.Module,
        backbone: Backbone,
        num_classes: int,
        unfreeze_blocks: int,
        dropout: float,
        weights_sha256: str | None,
        channels: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        # Plain values only (no spec with its callables): the model must pickle for MLflow.
        self.teacher = spec.name
        self.strategy = strategy
        self.num_classes = num_classes
        self.unfreeze_blocks = unfreeze_blocks
        self.weights_sha256 = weights_sha256
        self._input_rule = (spec.size_multiple, spec.min_image_size)
        self.input_layer = input_layer
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(spec.feature_dim, num_classes)
        for module in self.frozen_modules():
            freeze(module)
        self.train()

    def frozen_modules(self) -> list[nn.Module]:
        """The backbone parts this strategy keeps fixed (weights and BatchNorm statistics)."""
        if self.strategy == "linear_probe":
            return [self.backbone]
        if self.strategy == "partial":
            first_trained = len(self.backbone.blocks) - self.unfreeze_blocks
            return [self.backbone.stem, *self.backbone.blocks[:first_trained]]
        return []

    def frozen_statistics(self) -> list[nn.Module]:
        """BatchNorm layers whose statistics stay fixed while their weights train: ``lp_ft``'s.
        Its head was fitted to features computed with the teacher's running statistics;
        batch statistics give other features (on the synthetic default at 64 px they moved
        each image's feature vector by more than its own norm, and the fitted head's loss
        rose from 0.32 to 1.3-5.2), so the first fine-tuning steps would undo the LP stage."""
        if self.strategy != "lp_ft":
            return []
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> Student:
        super().train(mode)
        for module in (*self.frozen_modules(), *self.frozen_statistics()):
            module.train(False)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [0, 1] → pooled penultimate features ``(B, feature_dim)``."""
        check_input(x, self.teacher, self.channels, *self._input_rule)
        return self.backbone(self.input_layer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def build_student(
    teacher: str | TeacherSpec,
    strategy: str,
    num_classes: int,
    unfreeze_blocks: int = 2,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    dropout: float = 0.2,
    channels: int = 1,
) -> Student:
    """Build a student for a transfer strategy; all configuration errors surface here.

    Args:
        teacher: teacher name (see ``tasks.model.teachers.known_teachers()``) or spec.
        strategy: one of :data:`STRATEGIES`.
        num_classes: size of the new head (at least 2).
        unfreeze_blocks: blocks ``partial`` trains, counted from the last; 0 trains only the
            top conv and the head. Must lie in ``0 .. spec.num_blocks`` for every strategy.
        pretrained: load the teacher's weights; False gives a random init (the freezing rules
            still apply). ``scratch`` never loads weights.
        weights_path: a user-supplied weights file instead of the bundled one.
        dropout: dropout rate before the head, in [0, 1).
        channels: input channels: 1 (gray: the stem summed over colour) or 3 (colour: the
            stem as trained).

    Returns:
        A :class:`Student` in train mode.

    Raises:
        MedtransferError: unknown teacher or strategy, out-of-range values, bad weights.
    """
    spec = get_teacher(teacher)
    _check_student_arguments(spec, strategy, num_classes, unfreeze_blocks, dropout)
    if weights_path is not None and not pretrained and strategy != "scratch":
        raise MedtransferError("weights_path was given with pretrained=False; drop one of them.")
    load = pretrained and strategy != "scratch"
    input_layer, backbone, sha256 = input_and_backbone(spec, load, weights_path, channels)
    student = Student(
        spec=spec,
        strategy=strategy,
        input_layer=input_layer,
        backbone=backbone,
        num_classes=num_classes,
        unfreeze_blocks=unfreeze_blocks,
        dropout=dropout,
        weights_sha256=sha256,
        channels=channels,
    )
    _track_batch_statistics(student, TRAINED_BN_MOMENTUM)
    return student


def _check_student_arguments(
    spec: TeacherSpec, strategy: str, num_classes: int, unfreeze_blocks: int, dropout: float
) -> None:
    """Raise :class:`MedtransferError` for an unknown strategy or an out-of-range value."""
    if strategy not in STRATEGIES:
        raise MedtransferError(
            f"Unknown transfer strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}."
        )
    if (
        isinstance(unfreeze_blocks, bool)
        or not isinstance(unfreeze_blocks, int)
        or not (0 <= unfreeze_blocks <= spec.num_blocks)
    ):
        raise MedtransferError(
            f"unfreeze_blocks must be an integer from 0 to {spec.num_blocks} (the blocks of "
            f"teacher {spec.name!r}), not {unfreeze_blocks!r}."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise MedtransferError(f"A classifier needs at least 2 classes, not {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise MedtransferError(f"dropout must be in [0, 1), not {dropout!r}.")


# TF-ported EfficientNets keep BatchNorm running statistics with momentum 0.01, made for
# hundreds of thousands of steps. A fine-tuning on a few hundred images takes a few hundred
# steps: at 0.01 the trained layers' running statistics would still mostly be their starting
# values at evaluation time (for `scratch`, whose activations start near zero, every
# prediction collapses to the same value). PyTorch's default of 0.1 tracks them in tens of steps.
TRAINED_BN_MOMENTUM = 0.1


def _track_batch_statistics(student: Student, momentum: float) -> None:
    """Set the momentum of every BatchNorm layer that trains (frozen ones never update)."""
    frozen = {id(m) for part in student.frozen_modules() for m in part.modules()}
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in frozen:
            module.momentum = momentum


def param_groups(model: Student, base_lr: float, backbone_lr_factor: float = 0.1) -> list[dict]:
    """Optimizer parameter groups for a student's trainable parameters.

    The head gets ``base_lr``. Pretrained backbone parts get a layer-wise decayed rate: with
    parts ``stem, block 0 .. block N-1, top`` numbered ``0 .. L-1`` (``L = N + 2``), part ``i``
    trains at ``base_lr * backbone_lr_factor ** ((L - i) / L)``: the stem at
    ``base_lr * backbone_lr_factor``, rising geometrically with depth toward ``base_lr``
    (general early features move least). ``partial`` uses the same rates for the parts it
    trains; ``scratch`` has nothing to preserve and trains everything at ``base_lr``.

    Returns:
        ``[{"name": ..., "params": [...], "lr": ...}, ...]`` from input to output, covering each
        trainable parameter once (frozen ones are left out); pass it to a ``torch.optim``
        optimizer.
    """
    if not base_lr > 0:
        raise MedtransferError(f"The learning rate must be positive, not {base_lr!r}.")
    if not 0 < backbone_lr_factor <= 1:
        raise MedtransferError(f"backbone_lr_factor must be in (0, 1], not {backbone_lr_factor!r}.")

    def trainable(module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    groups: list[dict] = []
    if model.strategy == "scratch":
        groups.append({"name": "backbone", "params": trainable(model.backbone), "lr": base_lr})
    else:
        parts = model.backbone.parts()
        names = ["stem", *(f"block{i}" for i in range(len(parts) - 2)), "top"]
        for depth, (name, part) in enumerate(zip(names, parts, strict=True)):
            params = trainable(part)
            if params:
                lr = base_lr * backbone_lr_factor ** ((len(parts) - depth) / len(parts))
                groups.append({"name": name, "params": params, "lr": lr})
    groups.append({"name": "head", "params": trainable(model.head), "lr": base_lr})
    groups = [group for group in groups if group["params"]]

    # Guard against a backbone part the grouping does not know about: such parameters would
    # silently never train.
    grouped = {id(p) for group in groups for p in group["params"]}
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    if grouped != wanted or sum(len(g["params"]) for g in groups) != len(grouped):
        raise RuntimeError("parameter groups do not cover each trainable parameter exactly once")
    return groups
