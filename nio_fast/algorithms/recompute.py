"""``mode="exact_recompute"``: the exact mode's Gram with the memory of ONE chunk's graph.

The exact mode (whole-batch forward, one backward with graph per chunk) keeps all D chunk
gradient graphs alive until GradCosine is differentiated: with BatchNorm every chunk's backward
walks the whole batch, so its graph is as large as a training step's, and peak memory grows
with D. Here the Gram is an autograd Function:

- forward: one whole-batch forward, kept, and the D chunk gradients WITHOUT graph, kept
  (D x P values) for the backward, and their Gram;
- backward (given dJ/dG): ``v_k = sum_j S[k, j] g_j`` with ``S = dJ/dG + dJ/dG^T``, then, chunk
  by chunk on the kept forward, chunk k's gradient WITH graph and the gradient of
  ``<g_k, v_k>`` (v_k held constant): ``sum_k H_k v_k = dJ/dtheta``, since ``dJ/dg_k = v_k``.
  Chunk k's graph is freed before chunk k+1's is built, the forward's after the last.

Same value and the same gradient as "exact" (to rounding); costs D more backward passes without
graph, and one pass over the forward graph per chunk instead of one in all (a saved tensor
cannot be cut from the forward graph: PyTorch re-attaches what a saved-tensor hook returns to
the original grad_fn). Keeping the forward costs no peak memory (it is alive with every chunk
graph either way) and saves recomputing it. The backward can run once, like any graph's.
BatchNorm ResNet-20, batch 64 (2 CPU cores, benchmarks/results/): see memory.md and
iteration.md (exact_recompute rows).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .. import ops
from ..ops.first_order import first_order
from .batching import call_model, slice_rows

LossFn = Callable[[Any, Any], torch.Tensor]


def _chunk_loss(outputs: Any, targets: Any, loss_fn: LossFn, start: int, end: int) -> torch.Tensor:
    from .gradcosine import checked_loss
    return checked_loss(loss_fn(slice_rows(outputs, start, end), slice_rows(targets, start, end)))


class _RecomputedChunkGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                bounds: Sequence[tuple[int, int]], backend: str, *params: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # the exact mode's chunk gradients without graph; the forward's is kept
            outputs = call_model(model, inputs)
            grads = []
            for start, end in bounds:
                chunk = torch.autograd.grad(_chunk_loss(outputs, targets, loss_fn, start, end), params,
                                            retain_graph=True, allow_unused=True)
                grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(chunk, params)])
        ctx.outputs, ctx.targets, ctx.loss_fn, ctx.bounds = outputs, targets, loss_fn, bounds
        ctx.grads, ctx.params = grads, params
        return ops.gram(grads, backend=backend)

    @staticmethod
    @first_order  # it differentiates the chunk graphs without keeping one
    def backward(ctx, grad_gram: torch.Tensor):
        params, grads = ctx.params, ctx.grads
        sym = grad_gram + grad_gram.T
        # v_k = sum_j S[k, j] g_j (dJ/dg_k), per parameter as a [D, ...] tensor.
        directions = [torch.tensordot(sym.to(p.dtype), torch.stack([row[i] for row in grads]), dims=1)
                      for i, p in enumerate(params)]
        del ctx.grads, grads
        total = [torch.zeros_like(p) for p in params]
        outputs, last = ctx.outputs, len(ctx.bounds) - 1
        del ctx.outputs  # the forward's graph goes with the last chunk's
        with torch.enable_grad():
            for k, (start, end) in enumerate(ctx.bounds):
                loss = _chunk_loss(outputs, ctx.targets, ctx.loss_fn, start, end)
                chunk = torch.autograd.grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
                inner = sum((g * v[k]).sum() for g, v in zip(chunk, directions) if g is not None and g.requires_grad)
                if not isinstance(inner, torch.Tensor):
                    continue  # chunk k's gradient does not depend on the parameters (a linear model's bias)
                contribution = torch.autograd.grad(inner, params, allow_unused=True, retain_graph=k < last)
                for p, piece in enumerate(contribution):
                    if piece is not None:
                        total[p] += piece
                del chunk, inner, contribution  # chunk k's graph goes here
        return (None,) * 6 + tuple(total)


def recomputed_exact_gram(model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
                          params: Sequence[torch.Tensor], bounds: Sequence[tuple[int, int]],
                          backend: str = "auto") -> torch.Tensor:
    """The [D, D] Gram of the exact mode's chunk gradients, differentiable w.r.t. ``params`` with
    the peak memory of one chunk's graph (module docstring)."""
    return _RecomputedChunkGram.apply(model, inputs, targets, loss_fn, list(bounds), backend, *params)
