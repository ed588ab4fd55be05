"""Small models covering the layer kinds NIO meets, with matching random batches."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, features: int = 12, width: int = 16, classes: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


class BatchNormCNN(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class GroupNormBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(2, channels)

    def forward(self, x):
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


class GroupNormResNet(nn.Module):
    def __init__(self, classes: int = 5, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(GroupNormBlock(channels), GroupNormBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token ids in, class logits out; dropout and LayerNorm included on purpose."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.embed(tokens))).mean(dim=1))


class OddParameters(nn.Module):
    """Frozen, unused, shared (tied) and zero-initialised parameters."""

    def __init__(self, features: int = 12, classes: int = 5):
        super().__init__()
        self.frozen = nn.Linear(features, 16)
        self.frozen.requires_grad_(False)
        self.shared = nn.Linear(16, 16)
        self.alias = self.shared  # the same module twice: one set of parameters, two names
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(16, classes)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        hidden = torch.relu(self.frozen(x))
        hidden = torch.relu(self.shared(hidden))
        hidden = torch.relu(self.alias(hidden))
        return self.head(hidden)


class Recurrent(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 10, classes: int = 5):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


def batch_for(name: str, num: int, dtype: torch.dtype = torch.float64, classes: int = 5):
    """A fresh random (inputs, targets) batch shaped for the model called ``name``."""
    targets = torch.randint(0, classes, (num,))
    if name in ("mlp", "odd"):
        return torch.randn(num, 12, dtype=dtype), targets
    if name in ("bn_cnn", "gn_resnet"):
        return torch.randn(num, 3, 7, 7, dtype=dtype), targets
    if name == "transformer":
        return torch.randint(0, 20, (num, 5)), targets
    if name == "recurrent":
        return torch.randn(num, 4, 6, dtype=dtype), targets
    raise KeyError(name)


MODELS = {
    "mlp": MLP,
    "bn_cnn": BatchNormCNN,
    "gn_resnet": GroupNormResNet,
    "transformer": TinyTransformer,
    "odd": OddParameters,
    "recurrent": Recurrent,
}


def make_model(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype)
