"""ResNet-18 and ResNet-50 in torchvision's layout (the user brings the weights file);
registered at the bottom."""

from __future__ import annotations

import torch
from torch import nn

from tasks.model.teachers._contract import Backbone
from tasks.model.teachers._torchvision import register_torchvision_teacher


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


register_torchvision_teacher(
    "resnet18",
    lambda c: ResNet(BasicBlock, (2, 2, 2, 2), c),
    _split_resnet,
    512,
    8,
    (1, 3, 5),  # the last stage's output is the top's (an empty top)
    "ResNet-18 (11.7 M parameters, 512 features)",
)
register_torchvision_teacher(
    "resnet50",
    lambda c: ResNet(Bottleneck, (3, 4, 6, 3), c),
    _split_resnet,
    2048,
    16,
    (2, 6, 12),
    "ResNet-50 (25.6 M parameters, 2048 features)",
)
