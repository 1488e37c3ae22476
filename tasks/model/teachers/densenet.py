"""DenseNet-121 in torchvision's layout (the user brings the weights file); registered at the
bottom."""

from __future__ import annotations

import torch
from torch import nn

from tasks.model.teachers._contract import Backbone
from tasks.model.teachers._torchvision import register_torchvision_teacher


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


register_torchvision_teacher(
    "densenet121",
    lambda c: DenseNet(c),
    _split_densenet,
    1024,
    7,
    (0, 2, 4),  # the last dense block's output is the top's but for norm5
    "DenseNet-121 (8.0 M parameters, 1024 features)",
)
