"""The teacher contract: what a teacher is made of, whatever its architecture.

A :class:`TeacherSpec` says how to build the network, how to read a weights file into it, how to
cut it into depth-ordered parts (a :class:`Backbone`: stem, blocks, top), its input
:class:`Normalisation`, feature dimension, block count and feature taps. A built teacher is a
:class:`BuiltTeacher`; the weights file it was loaded from a :class:`WeightsFile`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


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
        min_image_size: ... and at least this (see ``tasks.model.student.check_image_size``).
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
