"""A small CIFAR-style BatchNorm ResNet (He et al. 2016, section 4.2) for [N, 3, 32, 32] inputs.

Depth 6n + 2: a 3x3 stem, three stages of n basic blocks at 32x32, 16x16 and 8x8 (the first
block of the second and third stage strides by 2 and projects its shortcut with a 1x1
convolution + BatchNorm), global average pooling and a linear classifier. Few channels keep it
fast on one CPU thread.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "cifar_resnet"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with stage widths ``widths`` (see the module docstring)."""

    def __init__(self, blocks_per_stage: int = 1, widths: tuple[int, int, int] = (8, 16, 32),
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))


def cifar_resnet(*, blocks_per_stage: int = 1, widths: tuple[int, int, int] = (8, 16, 32),
                 num_classes: int = 10) -> CifarResNet:
    """ResNet-(6 * blocks_per_stage + 2) with PyTorch's default initialization
    (BatchNorm weight 1, bias 0; conv and linear kaiming_uniform with a = sqrt(5))."""
    return CifarResNet(blocks_per_stage, tuple(widths), num_classes)
