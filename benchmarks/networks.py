"""The networks the benchmarks time: CIFAR-style ResNet-20 (BatchNorm or GroupNorm), a GroupNorm
ResNet-18 for 32x32 inputs, and a small ViT."""
from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels // 2), channels)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), _norm(norm, outputs))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet of basic blocks: a 3x3 stem conv, stages of ``blocks[i]`` blocks at
    ``width * multipliers[i]`` channels whose first block has stride ``strides[i]``, global
    average pooling and a linear head."""

    def __init__(self, norm: str = "batch", classes: int = 10, width: int = 16, blocks=(3, 3, 3),
                 multipliers=(1, 2, 4), strides=(1, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU())
        layers, channels = [], width
        for count, multiplier, stride in zip(blocks, multipliers, strides, strict=True):
            out = width * multiplier
            for block in range(count):
                layers.append(BasicBlock(channels, out, stride if block == 0 else 1, norm))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


class ResNet20(CifarResNet):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels (0.27M parameters)."""

    def __init__(self, norm: str = "batch", classes: int = 10, width: int = 16):
        super().__init__(norm, classes, width)


class ResNet18(CifarResNet):
    """ResNet-18 for 32x32 inputs (the usual CIFAR variant: 3x3 stem, no max-pool): 4 stages of 2
    basic blocks, 64/128/256/512 channels, strides 1/2/2/2 (11.2M parameters at width 64)."""

    def __init__(self, norm: str = "group", classes: int = 10, width: int = 64):
        super().__init__(norm, classes, width, blocks=(2, 2, 2, 2), multipliers=(1, 2, 4, 8), strides=(1, 2, 2, 2))


class SmallViT(nn.Module):
    """A ViT for 32x32 inputs: 4x4 patches, pre-LayerNorm encoder, mean pooling."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, classes: int = 10, patch: int = 4):
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, patch, patch)
        self.position = nn.Parameter(torch.randn(1, (32 // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


MODELS = {
    "resnet20_gn": lambda **options: ResNet20("group", **options),
    "resnet20_bn": lambda **options: ResNet20("batch", **options),
    # GroupNorm: no layer couples the samples of a batch (sample-wise GradCosine's "factors" mode)
    "resnet18_gn": lambda **options: ResNet18("group", **options),
    "vit_small": SmallViT,
}


def make(name: str, seed: int = 0, **options) -> nn.Module:
    """The network ``name`` of MODELS, seeded; ``options`` go to its constructor (e.g. a ResNet's
    ``width``, which the quick runs of test_samplewise.py shrink)."""
    torch.manual_seed(seed)
    return MODELS[name](**options)


def images(batch: int, classes: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=generator),
            torch.randint(0, classes, (batch,), generator=generator))
