"""Small reference models for the 8x8 digits (see nio_fast.data), used by the demo, the
command line (``nio-fast init nio_fast.models:digits_mlp ...``) and the experiments.

Each builder takes keyword arguments only and returns a freshly initialised module with
PyTorch's default initialization (seed the global RNG before calling for a fixed draw).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_mlp", "digits_cnn", "digits_transformer", "RowTransformer"]

PIXELS = 64
ROWS = 8
CLASSES = 10


def digits_mlp(*, depth: int = 20, width: int = 64, in_features: int = PIXELS,
               num_classes: int = CLASSES) -> nn.Sequential:
    """A plain deep ReLU MLP: ``depth`` Linear layers in all (``depth - 1`` hidden layers of
    ``width`` units, then the classifier). Flattens its input, so any [N, ...] layout whose
    trailing size is ``in_features`` works. depth=20, width=64 is the FMP paper's MNIST net.
    """
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def digits_cnn(*, channels: int = 16, num_classes: int = CLASSES, in_channels: int = 1) -> nn.Sequential:
    """A small CNN for [N, in_channels, 8, 8] images: two 3x3 conv blocks at 8x8, a 2x2 max
    pool, one conv block at 4x4, global average pooling and a linear classifier."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    wide = 2 * channels
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, wide, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(wide, wide, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(wide, num_classes),
    )


class RowTransformer(nn.Module):
    """A post-LayerNorm Transformer encoder that reads a digit as 8 tokens, one per pixel
    row: row embedding plus a learned position embedding, ``layers`` encoder layers, mean
    pooling over tokens, a linear classifier. Accepts [N, 64], [N, 8, 8] or [N, 1, 8, 8]."""

    def __init__(self, *, d_model: int = 32, nhead: int = 4, layers: int = 2,
                 dim_feedforward: int = 64, num_classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Linear(ROWS, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(ROWS, d_model))
        # Post-LN (norm_first=False) as in the original Transformer; no dropout so that the
        # model is deterministic in training mode too.
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=0.0,
            batch_first=True, norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], ROWS, ROWS)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


def digits_transformer(*, d_model: int = 32, nhead: int = 4, layers: int = 2,
                       dim_feedforward: int = 64, num_classes: int = CLASSES) -> RowTransformer:
    """A small post-LN Transformer over digit rows as tokens (see `RowTransformer`)."""
    return RowTransformer(d_model=d_model, nhead=nhead, layers=layers,
                          dim_feedforward=dim_feedforward, num_classes=num_classes)
