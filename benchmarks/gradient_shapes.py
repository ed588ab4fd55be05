"""Parameter shapes of real networks, written out as data, and random gradients of those shapes.

torchvision is not a dependency, so the shapes are derived here from the architectures, in
the order ``model.parameters()`` yields them in torchvision:

- ``resnet50``: 161 tensors, 25,557,032 values (torchvision's ``resnet50()``: conv1 + bn1,
  bottleneck stages of [3, 4, 6, 3] blocks (conv1/bn1, conv2/bn2, conv3/bn3, and a 1x1
  downsample conv + bn in each stage's first block), fc 2048 -> 1000);
- ``vit_b_16``: 152 tensors, 86,567,656 values (torchvision's ``vit_b_16()``: class token,
  conv_proj 768x3x16x16 + bias, position embedding 1x197x768, 12 encoder layers, final
  LayerNorm, head 768 -> 1000);
- ``tiny``: a handful of small, oddly sized tensors for quick plumbing runs.

The totals are asserted at import (below), so a typo in the architecture cannot go unnoticed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Shape = tuple[int, ...]


def resnet50_shapes(num_classes: int = 1000) -> list[Shape]:
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1 weight and bias
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_channels = width * 4  # bottleneck expansion
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:  # the projection shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(num_classes, in_channels), (num_classes,)]
    return shapes


def vit_b_16_shapes(num_classes: int = 1000) -> list[Shape]:
    hidden, mlp, layers, patch, tokens = 768, 3072, 12, 16, 197  # 14 x 14 patches + class token
    shapes: list[Shape] = [(1, 1, hidden), (hidden, 3, patch, patch), (hidden,), (1, tokens, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,),                     # ln_1
                   (3 * hidden, hidden), (3 * hidden,),      # self_attention in_proj
                   (hidden, hidden), (hidden,),              # self_attention out_proj
                   (hidden,), (hidden,),                     # ln_2
                   (mlp, hidden), (mlp,), (hidden, mlp), (hidden,)]  # mlp
    shapes += [(hidden,), (hidden,), (num_classes, hidden), (num_classes,)]  # encoder.ln, heads.head
    return shapes


def tiny_shapes() -> list[Shape]:
    return [(16, 3, 3, 3), (16,), (1,), (33, 7), (129,), (8, 16)]


MODEL_SHAPES: dict[str, list[Shape]] = {
    "resnet50": resnet50_shapes(),
    "vit_b_16": vit_b_16_shapes(),
    "tiny": tiny_shapes(),
}


def num_values(name: str) -> int:
    """m: the number of values in one gradient of model ``name``."""
    return sum(math.prod(shape) for shape in MODEL_SHAPES[name])


# The published parameter counts of torchvision's models.
assert len(MODEL_SHAPES["resnet50"]) == 161 and num_values("resnet50") == 25_557_032
assert len(MODEL_SHAPES["vit_b_16"]) == 152 and num_values("vit_b_16") == 86_567_656


def gradient_lists(name: str, D: int, dtype: torch.dtype = torch.float32, device="cpu",
                   generator: Optional[torch.Generator] = None, shared: float = 0.0,
                   requires_grad: bool = False) -> list[list[torch.Tensor]]:
    """D lists of random gradients shaped like model ``name``'s parameters (``grads[d][p]``).

    Each tensor is its own allocation, as autograd returns them. ``shared`` in [0, 1] mixes a
    common component into every gradient (``sqrt(shared) * c + sqrt(1 - shared) * noise``), so
    that off-diagonal Gram entries are about ``shared * m`` instead of about ``sqrt(m)``: a
    correctness check then sees a wrong off-diagonal entry. ``generator`` must live on
    ``device`` (CUDA generators for CUDA tensors).
    """
    device = torch.device(device)
    shapes = MODEL_SHAPES[name]
    common = [torch.randn(shape, dtype=dtype, device=device, generator=generator) for shape in shapes] if shared else None
    grads = []
    for _ in range(D):
        row = []
        for p, shape in enumerate(shapes):
            tensor = torch.randn(shape, dtype=dtype, device=device, generator=generator)
            if common is not None:
                tensor.mul_(math.sqrt(1.0 - shared)).add_(common[p], alpha=math.sqrt(shared))
            row.append(tensor.requires_grad_(requires_grad))
        grads.append(row)
    return grads
