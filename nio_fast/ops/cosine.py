"""GradCosine and gradient norms from a Gram matrix (NIO.md, "One GradCosine evaluation", 5-6).

The Gram is D x D with D <= a few hundred: these are a handful of tiny ops, differentiable by
autograd; a fused kernel would save microseconds against an iteration of milliseconds.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class CosineTerms(NamedTuple):
    value: torch.Tensor
    """0-dim: mean off-diagonal cosine, in [-1, 1]."""
    norms: torch.Tensor
    """[D]: the gradient norms sqrt(G[k, k])."""
    cosine: torch.Tensor
    """[D, D]: G[i, j] / (n_i n_j)."""


def gradcosine_from_gram(gram: torch.Tensor) -> CosineTerms:
    """GradCosine, norms and the cosine matrix of a Gram matrix ``gram`` [D, D], D >= 2.

    A chunk whose gradient is exactly zero has no direction; its cosines are NaN, which the
    callers treat as a non-finite GradCosine.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"gram: expected a square [D, D] matrix with D >= 2, got shape {tuple(gram.shape)}")
    num_grads = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    off_diagonal = ~torch.eye(num_grads, dtype=torch.bool, device=gram.device)
    value = cosine[off_diagonal].sum() / (num_grads * (num_grads - 1))
    return CosineTerms(value, norms, cosine)
