"""First-order backwards whose derivative is refused where it is asked for, not dropped.

Several backwards here are written for one differentiation only (the per-sample Grams of layer
factors, the per-sample norm affines, recomputed segments, ``exact_recompute``, the distributed
Gram): NIO differentiates GradCosine once. PyTorch's ``once_differentiable`` hangs its error on
detached copies of the gradients, so an ``autograd.grad`` with respect to the real inputs (a
derivative of a GradCosine gradient taken with ``create_graph=True``: a third derivative) never
reaches the error, and the terms through these backwards are silently left out: measured on a
two-layer MLP, the third derivative of sample-wise GradCosine was off by 50-90% of its size (of
sub-batch GradCosine too, before the fused Gram's backward built a graph from its plain formula
when asked to: now exact). :func:`first_order` hangs a node on the real edges (the incoming
gradients and the saved tensors), and that node raises.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.autograd import Function


class _RefusedDerivative(Function):
    """The identity on a backward's results; its own backward raises."""

    @staticmethod
    def forward(ctx, name: str, count: int, *tensors: torch.Tensor):
        ctx.name = name
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"nio_fast: the backward of {ctx.name} is differentiable once; a derivative of it "
                           f"(e.g. a third derivative of GradCosine) is not supported")


def first_order(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``Function.backward``: it runs without a graph; when a graph is being built
    (``create_graph=True``) its results carry a node that refuses to be differentiated."""
    name = backward.__qualname__.rsplit(".", 1)[0]

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        sources = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        single = not isinstance(results, tuple)
        results = (results,) if single else results
        where = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
        if not sources or not where:
            return results[0] if single else results
        guarded = _RefusedDerivative.apply(name, len(where), *(results[i] for i in where), *sources)
        results = list(results)
        for i, tensor in zip(where, guarded):
            results[i] = tensor
        return results[0] if single else tuple(results)

    return wrapper
