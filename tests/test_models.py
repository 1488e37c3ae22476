"""The student: strategies, grayscale stem, learning rates, input rules. Real weights, no mocks.

Images are 64x64 (the smallest comfortable size the rule allows) to keep the tests fast on CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import pytest
import torch
from torch import nn

from tasks.errors import MedtransferError
from tasks.model import teachers
from tasks.model.student import (
    STRATEGIES,
    Student,
    build_student,
    check_image_size,
    param_groups,
)
from tasks.model.teacher_models import imagenet_classifier, teacher_feature_extractor
from tasks.model.teachers import (
    DEFAULT_TEACHER,
    EFFICIENTNET_LITE0_SHA256,
    Normalisation,
    Normalise,
    build_teacher,
    get_teacher,
)

SIZE = 64
N_CLASSES = 3


def _images(batch: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in module.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


# ------------------------------------------------------------------------------- strategies --


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_trains_exactly_its_parts(strategy: str) -> None:
    student = build_student(DEFAULT_TEACHER, strategy, N_CLASSES, unfreeze_blocks=2)
    backbone = student.backbone
    head = _numel(student.head)
    assert head == 1280 * N_CLASSES + N_CLASSES
    expected = {
        "linear_probe": head,
        "partial": _numel(backbone.blocks[-2])
        + _numel(backbone.blocks[-1])
        + _numel(backbone.top)
        + head,
        "full": _numel(student),
        "lp_ft": _numel(student),  # its LP stage is the train stage's; then all trains
        "scratch": _numel(student),
    }[strategy]
    assert _trainable(student) == expected
    assert all(p.requires_grad for p in student.head.parameters())
    assert student.strategy == strategy and student.teacher == DEFAULT_TEACHER


@pytest.mark.parametrize("unfreeze_blocks", [0, 5, 16])
def test_partial_unfreezes_the_last_n_blocks(unfreeze_blocks: int) -> None:
    student = build_student(DEFAULT_TEACHER, "partial", N_CLASSES, unfreeze_blocks=unfreeze_blocks)
    blocks = student.backbone.blocks
    first_trained = 16 - unfreeze_blocks
    for index, block in enumerate(blocks):
        assert all(p.requires_grad == (index >= first_trained) for p in block.parameters())
    assert not any(p.requires_grad for p in student.backbone.stem.parameters())
    assert all(p.requires_grad for p in student.backbone.top.parameters())


@pytest.mark.parametrize("strategy", ["linear_probe", "partial"])
def test_frozen_batchnorm_statistics_stay_put_in_train_mode(strategy: str) -> None:
    student = build_student(DEFAULT_TEACHER, strategy, N_CLASSES, unfreeze_blocks=2)
    student.eval()
    student.train()  # a training loop's call must not wake the frozen parts
    frozen = student.frozen_modules()
    before = [_bn_buffers(module) for module in frozen]
    last_block_before = _bn_buffers(student.backbone.blocks[-1])

    student(_images())

    for module, buffers in zip(frozen, before, strict=True):
        assert not module.training
        for name, value in _bn_buffers(module).items():
            assert torch.equal(value, buffers[name]), name
    assert student.head.training
    last_block_after = _bn_buffers(student.backbone.blocks[-1])
    moved = not torch.equal(
        last_block_after["_bn1.running_mean"], last_block_before["_bn1.running_mean"]
    )
    assert moved == (strategy == "partial")  # a trained block does update its statistics


def test_full_strategy_updates_every_batchnorm() -> None:
    student = build_student(DEFAULT_TEACHER, "full", N_CLASSES)
    before = _bn_buffers(student.backbone.stem)
    student(_images())
    after = _bn_buffers(student.backbone.stem)
    assert not torch.equal(after["2.running_mean"], before["2.running_mean"])


@pytest.mark.parametrize("strategy", ["linear_probe", "partial", "full"])
def test_a_training_step_changes_only_trainable_parameters(strategy: str) -> None:
    torch.manual_seed(0)
    student = build_student(DEFAULT_TEACHER, strategy, N_CLASSES, unfreeze_blocks=2)
    before = {name: t.clone() for name, t in student.state_dict().items()}
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(param_groups(student, base_lr=0.1), lr=0.1)

    loss = nn.functional.cross_entropy(student(_images()), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    after = student.state_dict()
    parameters = dict(student.named_parameters())
    changed = {name for name in parameters if not torch.equal(after[name], before[name])}
    assert changed <= trainable
    assert {"head.weight", "head.bias"} <= changed
    assert all(parameters[name].grad is not None for name in trainable)
    # (a few tensors may see a step below float32 resolution, hence not all of them)
    assert len(changed) >= 0.9 * len(trainable)
    assert all(parameters[n].grad is None for n in set(parameters) - trainable)
    # Frozen parts keep every tensor, BatchNorm statistics included.
    frozen_prefixes = {
        "linear_probe": ("backbone.",),
        "partial": ("backbone.stem.", *(f"backbone.blocks.{i}." for i in range(14))),
        "full": (),
    }[strategy]
    frozen_state = [name for name in before if name.startswith(frozen_prefixes)]
    assert len(frozen_state) > 0 or strategy == "full"
    assert all(torch.equal(after[name], before[name]) for name in frozen_state)


# -------------------------------------------------------------------------- grayscale stem --


def test_grayscale_stem_equals_the_rgb_teacher_on_repeated_gray() -> None:
    student = build_student(DEFAULT_TEACHER, "linear_probe", N_CLASSES)
    assert student.backbone.stem[1].in_channels == 1
    rgb = build_teacher(DEFAULT_TEACHER)
    normalise = Normalise(get_teacher(DEFAULT_TEACHER).normalisation)
    gray = _images(seed=1)
    with torch.no_grad():
        expected = rgb.backbone(normalise(gray.repeat(1, 3, 1, 1)))
        assert torch.allclose(student.eval().features(gray), expected, rtol=1e-4, atol=1e-4)
        teacher = teacher_feature_extractor(DEFAULT_TEACHER)
        assert torch.allclose(teacher(gray), expected, rtol=1e-4, atol=1e-4)
        # and the colour classifier agrees on the same gray image
        logits = imagenet_classifier(DEFAULT_TEACHER)(gray.repeat(1, 3, 1, 1))
        assert torch.allclose(logits, rgb.classifier(expected), rtol=1e-4, atol=1e-4)


def test_per_channel_normalisation_repeats_gray_instead_of_folding() -> None:
    # A teacher with torchvision-style per-channel statistics cannot fold its stem exactly;
    # the student then repeats the gray channel. Same weights, different normalisation.
    spec = dataclasses.replace(
        get_teacher(DEFAULT_TEACHER),
        name="lite0-imagenet-stats",
        normalisation=Normalisation.from_mean_std((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    )
    student = build_student(spec, "linear_probe", N_CLASSES).eval()
    assert not student.input_layer.fold and student.backbone.stem[1].in_channels == 3
    gray = _images(seed=2)
    with torch.no_grad():
        rgb = Normalise(spec.normalisation)(gray.repeat(1, 3, 1, 1))
        expected = build_teacher(spec).backbone(rgb)
        assert torch.allclose(student.features(gray), expected, rtol=1e-4, atol=1e-4)


def test_normalisation_is_tflite_style_and_applied_once() -> None:
    student = build_student(DEFAULT_TEACHER, "linear_probe", N_CLASSES)
    pixels = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 1, 1, 3)
    normalised = student.input_layer(pixels).flatten()
    assert torch.allclose(normalised, torch.tensor([-127 / 128, 0.0, 1.0]))
    # once: the only place the coefficients live is the input layer
    normalisers = [m for m in student.modules() if isinstance(m, Normalise)]
    assert normalisers == [student.input_layer.normalise]


def test_scratch_is_the_same_network_randomly_initialised() -> None:
    pretrained = build_student(DEFAULT_TEACHER, "full", N_CLASSES)
    scratch = build_student(DEFAULT_TEACHER, "scratch", N_CLASSES)
    assert pretrained.weights_sha256 == EFFICIENTNET_LITE0_SHA256
    assert scratch.weights_sha256 is None
    shapes = {name: p.shape for name, p in pretrained.named_parameters()}
    assert {name: p.shape for name, p in scratch.named_parameters()} == shapes
    assert scratch.backbone.stem[1].in_channels == 1
    assert not torch.allclose(scratch.backbone.stem[1].weight, pretrained.backbone.stem[1].weight)
    with torch.no_grad():
        a, b = pretrained.eval().features(_images()), scratch.eval().features(_images())
    assert (a - b).abs().mean() > 0.1 * a.abs().mean()


def test_pretrained_false_gives_random_weights_with_the_same_freezing() -> None:
    student = build_student(DEFAULT_TEACHER, "linear_probe", N_CLASSES, pretrained=False)
    assert student.weights_sha256 is None
    assert _trainable(student) == _numel(student.head)


# ---------------------------------------------------------------------------- learning rates --


def test_full_param_groups_rise_with_depth() -> None:
    student = build_student(DEFAULT_TEACHER, "full", N_CLASSES)
    groups = param_groups(student, base_lr=1e-3, backbone_lr_factor=0.1)
    names = [g["name"] for g in groups]
    assert names == ["stem", *(f"block{i}" for i in range(16)), "top", "head"]
    rates = [g["lr"] for g in groups]
    assert all(low < high for low, high in itertools.pairwise(rates))
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-3)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(student.parameters()))


def test_other_strategies_param_groups() -> None:
    full_student = build_student(DEFAULT_TEACHER, "full", 2)
    full = {g["name"]: g["lr"] for g in param_groups(full_student, 1e-3)}
    partial = param_groups(build_student(DEFAULT_TEACHER, "partial", 2, unfreeze_blocks=3), 1e-3)
    assert [g["name"] for g in partial] == ["block13", "block14", "block15", "top", "head"]
    assert all(g["lr"] == full[g["name"]] for g in partial)
    probe = param_groups(build_student(DEFAULT_TEACHER, "linear_probe", 2), 1e-3)
    assert [(g["name"], g["lr"], len(g["params"])) for g in probe] == [("head", 1e-3, 2)]
    scratch = build_student(DEFAULT_TEACHER, "scratch", 2)
    groups = param_groups(scratch, 1e-3)
    assert {g["lr"] for g in groups} == {1e-3}
    assert sum(len(g["params"]) for g in groups) == len(list(scratch.parameters()))


# ------------------------------------------------------------------------------ bad configs --


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "finetune"}, "Unknown transfer strategy 'finetune'"),
        ({"unfreeze_blocks": -1}, "unfreeze_blocks must be an integer from 0 to 16"),
        ({"unfreeze_blocks": 17}, "unfreeze_blocks must be an integer from 0 to 16"),
        ({"num_classes": 1}, "at least 2 classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"pretrained": False, "weights_path": "w.pt"}, "weights_path was given"),
        ({"teacher": "efficientnet-lite9"}, "Unknown teacher"),
    ],
)
def test_bad_configuration_is_refused_before_training(kwargs: dict, message: str) -> None:
    arguments = {"teacher": DEFAULT_TEACHER, "strategy": "partial", "num_classes": 2, **kwargs}
    with pytest.raises(MedtransferError, match=message):
        build_student(**arguments)


def test_bad_learning_rates_are_refused() -> None:
    student = build_student(DEFAULT_TEACHER, "full", 2, pretrained=False)
    with pytest.raises(MedtransferError, match="learning rate"):
        param_groups(student, base_lr=0)
    with pytest.raises(MedtransferError, match="backbone_lr_factor"):
        param_groups(student, base_lr=1e-3, backbone_lr_factor=1.5)


@pytest.mark.parametrize("size", [32, 64, 96, 128, 224, 512, (64, 96)])
def test_image_sizes_that_fit(size) -> None:
    check_image_size(DEFAULT_TEACHER, size)


@pytest.mark.parametrize("size", [0, 16, 28, 48, 100, 129, (64, 100), 128.0])
def test_image_sizes_that_do_not_fit(size) -> None:
    with pytest.raises(MedtransferError, match="multiples of 32 and at least 32"):
        check_image_size(DEFAULT_TEACHER, size)


def test_lite0_is_exactly_monais_efficientnet_with_relu6_as_before() -> None:
    # Our own EfficientNet-Lite module replaced MONAI's EfficientNet (whose ReLU6 could only
    # be set through its private _swish): on the same weights both give the same logits, at
    # the native size and at the 64 px MONAI's padding (fixed for 224) agrees with TF "same".
    from monai.networks.nets import EfficientNet

    stages = [
        "r1_k3_s11_e1_i32_o16",
        "r2_k3_s22_e6_i16_o24",
        "r2_k5_s22_e6_i24_o40",
        "r3_k3_s22_e6_i40_o80",
        "r3_k5_s11_e6_i80_o112",
        "r4_k5_s22_e6_i112_o192",
        "r1_k3_s11_e6_i192_o320",
    ]
    reference = EfficientNet(stages, spatial_dims=2, in_channels=3, num_classes=1000)
    for module in reference.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=True)
    state = teachers.read_state_dict(teachers.resolve_weights(DEFAULT_TEACHER))
    stage_of = {
        int(name): stage
        for stage, stack in enumerate(reference._blocks)
        for name, _ in stack.named_children()
    }
    nested = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            key = ".".join(["_blocks", str(stage_of[int(parts[1])]), *parts[1:]])
        nested[key] = value
    reference.load_state_dict(nested)
    ours = imagenet_classifier(DEFAULT_TEACHER)
    for size in (224, 64):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = reference.eval()(ours.normalise(x))
            assert torch.allclose(ours(x), expected, atol=1e-5), size


def test_wrong_input_shapes_are_refused_at_forward() -> None:
    student = build_student(DEFAULT_TEACHER, "linear_probe", 2, pretrained=False)
    with pytest.raises(MedtransferError, match="100x100"):
        student(torch.rand(1, 1, 100, 100))
    with pytest.raises(MedtransferError, match=r"\(batch, 1, height, width\)"):
        student(torch.rand(1, 3, 64, 64))
    with pytest.raises(MedtransferError, match=r"\(batch, 3, height, width\)"):
        imagenet_classifier(DEFAULT_TEACHER)(torch.rand(1, 1, 64, 64))


# ------------------------------------------------------------------ teacher and plumbing --


def test_teacher_feature_extractor_is_frozen_pristine_and_separate() -> None:
    student = build_student(DEFAULT_TEACHER, "full", N_CLASSES)
    teacher = teacher_feature_extractor(DEFAULT_TEACHER)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    student_storage = {p.data_ptr() for p in student.parameters()}
    assert not student_storage & {p.data_ptr() for p in teacher.parameters()}

    x = _images(seed=3)
    with torch.no_grad():
        before = teacher(x)
        for p in student.parameters():
            p.add_(1.0)  # whatever happens to the student ...
        assert torch.equal(teacher(x), before)  # ... the teacher does not move
    assert before.shape == (4, 1280)

    # an attack needs the gradient of the features with respect to the input
    x.requires_grad_(True)
    teacher(x).norm().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_channels_last_gives_the_same_logits() -> None:
    student = build_student(DEFAULT_TEACHER, "partial", N_CLASSES).eval()
    x = _images()
    with torch.no_grad():
        expected = student(x)
        student = student.to(memory_format=torch.channels_last)
        got = student(x.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_student_pickles_for_mlflow() -> None:
    student = build_student(DEFAULT_TEACHER, "partial", N_CLASSES).eval()
    restored: Student = pickle.loads(pickle.dumps(student))
    x = _images()
    with torch.no_grad():
        assert torch.equal(restored(x), student(x))
    assert restored.weights_sha256 == EFFICIENTNET_LITE0_SHA256
    assert _trainable(restored) == _trainable(student)
    restored.train()
    assert not restored.backbone.stem.training  # the strategy survives the round trip
