"""One GradCosine evaluation (NIO.md, "One GradCosine evaluation"): chunk gradients, Gram, cosine.

Two ways to get the D chunk gradients, equal whenever no layer couples samples:
- ``"exact"``: forward the whole batch once, then one gradient per chunk loss (BatchNorm
  statistics see all N samples, as the spec says);
- ``"per_chunk"``: forward each chunk on its own; each backward then walks only that chunk's
  activations instead of the whole batch's, so D gradients cost about one training step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .. import ops
from .batching import call_model, chunk_bounds, num_samples, slice_rows
from .model_state import couples_samples

LossFn = Callable[[Any, Any], torch.Tensor]

MODES = ("auto", "exact", "per_chunk")


@dataclass
class GradCosineResult:
    """GradCosine of one batch, with the terms it is made of."""

    value: torch.Tensor
    """0-dim: mean pairwise cosine of the D chunk gradients, in [-1, 1]."""
    norms: torch.Tensor
    """[D]: the chunk gradient norms."""
    gram: torch.Tensor
    """[D, D]: inner products of the chunk gradients."""
    cosine: torch.Tensor
    """[D, D]: the cosine matrix."""
    chunks: list[tuple[int, int]]
    """The (start, end) sample range of each chunk."""
    mode: str
    """The mode that ran: ``"exact"`` or ``"per_chunk"``."""

    @property
    def gnorm(self) -> torch.Tensor:
        """Mean chunk gradient norm (the quantity NIO bounds by gamma)."""
        return self.norms.mean()


def resolve_mode(mode: str, model: nn.Module) -> str:
    """``"auto"`` is per_chunk only where that cannot change the value: no batch coupling."""
    if mode == "auto":
        return "exact" if couples_samples(model) else "per_chunk"
    return mode


def checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: must return the mean loss of the batch as a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError("loss_fn: the loss it returned does not depend on the selected parameters "
                         "(no gradient can flow); check params and the model")
    return loss.reshape(())


def chunk_gradients(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                    params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]], mode: str,
                    create_graph: bool) -> list[list[Optional[torch.Tensor]]]:
    """``grads[k][p]``: gradient of chunk k's mean loss w.r.t. ``params[p]`` (None: unused)."""
    grads = []
    if mode == "exact":
        outputs = call_model(model, inputs)
        for k, (start, end) in enumerate(bounds):
            loss = checked_loss(loss_fn(slice_rows(outputs, start, end), slice_rows(targets, start, end)))
            grads.append(list(torch.autograd.grad(
                loss, params, create_graph=create_graph, allow_unused=True,
                retain_graph=create_graph or k < len(bounds) - 1)))
        return grads
    for start, end in bounds:
        outputs = call_model(model, slice_rows(inputs, start, end))
        loss = checked_loss(loss_fn(outputs, slice_rows(targets, start, end)))
        grads.append(list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)))
    return grads


def dense_gradient_table(grads: list[list[Optional[torch.Tensor]]],
                         params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Drop parameters no chunk reaches (they add nothing to the Gram); zero-fill the rest."""
    used = [p for p in range(len(params)) if any(row[p] is not None for row in grads)]
    if not used:
        raise ValueError("params: none of the selected parameters influences the loss")
    return [[row[p] if row[p] is not None else torch.zeros_like(params[p]) for p in used] for row in grads]


def evaluate_gradcosine(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                        params: Sequence[torch.Tensor], sub_batches: int, overlap: float, mode: str,
                        create_graph: bool, backend: str = "auto") -> GradCosineResult:
    """GradCosine of one batch; the caller has already put the model in NIO's modes."""
    bounds = chunk_bounds(num_samples(inputs), sub_batches, overlap)
    mode = resolve_mode(mode, model)
    grads = chunk_gradients(model, inputs, targets, loss_fn, params, bounds, mode, create_graph)
    gram = ops.gram(dense_gradient_table(grads, params), backend=backend)
    terms = ops.gradcosine_from_gram(gram)
    return GradCosineResult(terms.value, terms.norms, gram, terms.cosine, bounds, mode)
