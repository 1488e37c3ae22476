"""The teacher zoo: Lite1/Lite2 from their pinned packages, proven on real photographs; ResNet and
DenseNet in torchvision's layout from a user's file, strictly; every teacher's feature taps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data, transform

from tasks.errors import MedtransferError
from tasks.model.student import build_student
from tasks.model.teacher_models import imagenet_classifier
from tasks.model.teachers import (
    EFFICIENTNET_LITE1_SHA256,
    EFFICIENTNET_LITE2_SHA256,
    build_teacher,
    get_teacher,
    resolve_weights,
)


def _photo(image) -> torch.Tensor:
    rgb = transform.resize(image(), (224, 224), anti_aliasing=True)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]


@pytest.mark.parametrize(
    ("teacher", "sha256", "n_params"),
    [
        ("efficientnet-lite1", EFFICIENTNET_LITE1_SHA256, 5_416_680),
        ("efficientnet-lite2", EFFICIENTNET_LITE2_SHA256, 6_092_072),
    ],
)
def test_lite1_and_lite2_load_their_pinned_files_and_name_a_cat_and_an_espresso(
    teacher: str, sha256: str, n_params: int
) -> None:
    assert resolve_weights(teacher).sha256 == sha256
    classifier = imagenet_classifier(teacher)  # strict load: the architecture is exact
    assert sum(p.numel() for p in classifier.parameters()) == n_params
    with torch.no_grad():
        for image, imagenet_class in [(data.chelsea, 285), (data.coffee, 967)]:
            probabilities = classifier(_photo(image)).softmax(1)[0]
            assert int(probabilities.argmax()) == imagenet_class
            assert float(probabilities[imagenet_class]) > 0.5


# torchvision's parameter counts and a few of its key names and shapes (published values).
TORCHVISION = {
    "resnet18": (11_689_512, {"layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)}),
    "resnet50": (
        25_557_032,
        {
            "layer3.5.conv3.weight": (1024, 256, 1, 1),
            "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        },
    ),
    "densenet121": (
        7_978_856,
        {
            "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
            "features.transition3.conv.weight": (512, 1024, 1, 1),
            "classifier.weight": (1000, 1024),
        },
    ),
}


@pytest.mark.parametrize("teacher", sorted(TORCHVISION))
def test_user_architectures_have_torchvisions_layout_and_load_a_file_strictly(
    teacher: str, tmp_path: Path
) -> None:
    n_params, keys = TORCHVISION[teacher]
    network = get_teacher(teacher).build_network(3)
    state = network.state_dict()
    assert sum(p.numel() for p in network.parameters()) == n_params
    assert {k: tuple(state[k].shape) for k in keys} == keys
    own = tmp_path / f"{teacher}.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, own)  # a DataParallel save
    built = build_teacher(teacher, weights_path=own)
    assert built.weights.sha256 and not built.weights.pinned
    name = next(iter(keys))
    assert torch.equal(dict(built.backbone.named_buffers()).get(name, state[name]), state[name])

    del state[name]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(MedtransferError, match=rf"missing: {name}.*unexpected: extra\.weight"):
        build_teacher(teacher, weights_path=broken)


def test_a_user_architecture_without_a_file_asks_for_one() -> None:
    with pytest.raises(MedtransferError, match=r"ships no weights.*weights_path"):
        build_student("resnet18", "partial", 2)


def test_old_densenet_files_with_dotted_layer_names_load(tmp_path: Path) -> None:
    state = get_teacher("densenet121").build_network(3).state_dict()
    old = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "old.pt"
    torch.save(old, path)
    built = build_teacher("densenet121", weights_path=path)
    layer = built.backbone.blocks[0]["denselayer1"]
    assert torch.equal(layer.conv2.weight, state["features.denseblock1.denselayer1.conv2.weight"])


@pytest.mark.parametrize(
    ("teacher", "channels"),
    [
        ("efficientnet-lite0", [16, 24, 40, 80, 112, 192, 320, 1280]),
        ("efficientnet-lite2", [16, 24, 48, 88, 120, 208, 352, 1280]),
        ("resnet18", [64, 128, 256, 512]),
        ("resnet50", [256, 512, 1024, 2048]),
        ("densenet121", [256, 512, 1024, 1024]),
    ],
)
def test_every_teacher_taps_each_stage_and_the_top(teacher: str, channels: list[int]) -> None:
    spec = get_teacher(teacher)
    built = build_teacher(teacher, pretrained=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tapped = built.backbone.taps(x, spec.stage_ends)
        assert [t.shape[1] for t in tapped] == channels
        assert torch.equal(tapped[-1], built.backbone(x))  # the last tap is the features


def test_a_resnet_student_trains_from_a_users_file(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(get_teacher("resnet18").build_network(3).state_dict(), path)
    student = build_student("resnet18", "partial", 2, unfreeze_blocks=2, weights_path=path)
    logits = student(torch.rand(3, 1, 64, 64))
    assert logits.shape == (3, 2)
    trained = {n.split(".")[1] for n, p in student.backbone.named_parameters() if p.requires_grad}
    assert trained == {"6", "7"}  # the last two residual blocks; stem and blocks 0-5 frozen
