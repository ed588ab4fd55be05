"""LayerNorm whose backward and double backward are two passes over each row.

NIO differentiates through the backward pass, and PyTorch's LayerNorm pays for the second
derivative with ``layer_norm_double_backward``, a composite of about thirty elementwise ops and
reductions: 13% of an NIO iteration on the small ViT (batch 64, D = 4, 2-core CPU,
torch.profiler). Here the backward is PyTorch's fused kernel, wrapped in an autograd Function
whose derivative is a fused kernel of the extension (``csrc/layer_norm.cpp``: a statistics pass
and an output pass per row). float32 / float64 on the CPU, outside torch.func transforms;
everything else is ``F.layer_norm`` itself (CUDA included: no GPU kernel yet).

The plain twins are GroupNorm's (``group_norm.py``): a row of E normalised values is one sample
of E channels in one group, so [R, E, 1] with 1 group turns one into the other.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .. import availability
from .first_order import first_order
from .group_norm import group_norm_backward_reference, group_norm_double_backward_reference

Tensor = torch.Tensor

BACKENDS = ("auto", "cpp", "torch")


def _rows(t: Tensor, width: int) -> Tensor:
    """[..., *normalized_shape] -> [R, E, 1]: R samples of E channels, one group each."""
    return t.reshape(-1, width, 1)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1)


def layer_norm_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], width: int,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused backward over the last ``width`` values of each row: (grad_x,
    grad_weight [E], grad_bias [E]); differentiable."""
    grad_x, grad_weight, grad_bias = group_norm_backward_reference(_rows(grad_out, width), _rows(x, width),
                                                                   _flat(weight), 1, eps)
    return grad_x.reshape_as(x), grad_weight.sum(0), grad_bias.sum(0)


def layer_norm_double_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], width: int,
                                         eps: float, u: Optional[Tensor], p: Optional[Tensor],
                                         q: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused double backward: the VJP of :func:`layer_norm_backward_reference` with
    cotangents u (like x), p and q ([E]); (d grad_out, d x, d weight [E]). Differentiable."""
    rows = x.numel() // max(width, 1)
    per_row = [None if t is None else _flat(t).expand(rows, width) for t in (p, q)]
    d_grad_out, d_x, d_weight = group_norm_double_backward_reference(
        _rows(grad_out, width), _rows(x, width), _flat(weight), 1, eps, None if u is None else _rows(u, width),
        *per_row)
    return d_grad_out.reshape_as(x), d_x.reshape_as(x), d_weight.sum(0)


def _kernels(x: Tensor, backend: str):
    return availability.cpu_kernels_for(x, backend, "layer_norm")


class _LayerNorm(Function):
    """(y, mean, rstd) of native_layer_norm; backward through :class:`_LayerNormBackward` when a
    graph is built."""

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps, backend):
        return torch.native_layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, bias, eps, backend = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.eps, ctx.backend = normalized_shape, eps, backend
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph to build: the derivative of the backward is fused
            grad_x, grad_weight, grad_bias = _LayerNormBackward.apply(grad_out, x, weight, bias, mean, rstd,
                                                                      ctx.normalized_shape, ctx.eps, ctx.backend)
        else:
            grad_x, grad_weight, grad_bias = _native_backward(grad_out, x, weight, bias, mean, rstd,
                                                              ctx.normalized_shape)
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, None, grad_weight if needs[2] else None,
                grad_bias if needs[3] else None, None, None)


def _native_backward(grad_out, x, weight, bias, mean, rstd, normalized_shape):
    """PyTorch's fused LayerNorm backward: (grad_x, grad_weight, grad_bias), None where no such
    parameter."""
    return torch.ops.aten.native_layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight, bias,
                                                     [True, weight is not None, bias is not None])


class _LayerNormBackward(Function):
    """(grad_x, grad_weight, grad_bias) of PyTorch's fused backward (None where no such parameter),
    with a fused derivative: the backward itself is already one kernel in PyTorch; its derivative
    is what PyTorch composes."""

    @staticmethod
    def forward(grad_out, x, weight, bias, mean, rstd, normalized_shape, eps, backend):
        if _kernels(x, backend) is None:  # the twins: differentiable end to end
            width = math.prod(normalized_shape)
            grad_x, grad_weight, grad_bias = layer_norm_backward_reference(grad_out, x, weight, width, eps)
            return (grad_x, None if weight is None else grad_weight.reshape(weight.shape),
                    None if bias is None else grad_bias.reshape(bias.shape))
        return _native_backward(grad_out, x, weight, bias, mean, rstd, normalized_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, _, mean, rstd, normalized_shape, eps, backend = inputs
        ctx.save_for_backward(grad_out, x, weight, mean, rstd)
        ctx.width, ctx.eps, ctx.backend = math.prod(normalized_shape), eps, backend

    @staticmethod
    def backward(ctx, u, p, q):
        grad_out, x, weight, mean, rstd = ctx.saved_tensors
        kernels, width = _kernels(x, ctx.backend), ctx.width
        if kernels is not None and not torch.is_grad_enabled():
            d_grad_out, d_x, d_weight = kernels.layer_norm_double_backward(
                grad_out.reshape(-1, width), x.reshape(-1, width), mean.reshape(-1), rstd.reshape(-1),
                _flat(weight), None if u is None else u.reshape(-1, width), _flat(p), _flat(q))
            d_grad_out, d_x = d_grad_out.reshape(x.shape), d_x.reshape(x.shape)
        else:  # the twins: no kernel here, or a graph to build for a third derivative
            d_grad_out, d_x, d_weight = layer_norm_double_backward_reference(grad_out, x, weight, width, ctx.eps,
                                                                             u, _flat(p), _flat(q))
        return (d_grad_out, d_x, d_weight.reshape(weight.shape) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None)


class _LayerNormWeightPerSample(Function):
    """sum over positions of grad_out * x_hat per sample, without storing x_hat."""

    @staticmethod
    def forward(ctx, grad_out, x, normalized_shape, eps):
        x_hat, mean, rstd = torch.native_layer_norm(x, normalized_shape, None, None, eps)
        ctx.save_for_backward(grad_out, x, mean, rstd)
        ctx.normalized_shape = normalized_shape
        return _per_sample_sum(grad_out * x_hat, normalized_shape)

    @staticmethod
    @first_order
    def backward(ctx, grad_rows):
        grad_out, x, mean, rstd = ctx.saved_tensors
        spread = grad_rows.reshape(grad_rows.shape[0], *([1] * (x.dim() - 1 - len(ctx.normalized_shape))),
                                   *ctx.normalized_shape)  # the same for every position of a sample
        d_grad_out = (x - mean) * rstd * spread
        d_x = torch.ops.aten.native_layer_norm_backward(grad_out * spread, x, ctx.normalized_shape, mean, rstd,
                                                        None, None, [True, False, False])[0]
        return d_grad_out, d_x, None, None


def _per_sample_sum(t: Tensor, normalized_shape: Sequence[int]) -> Tensor:
    return t.reshape(t.shape[0], -1, math.prod(normalized_shape)).sum(1)


def layer_norm_weight_per_sample(grad_out: Tensor, x: Tensor, normalized_shape: Sequence[int],
                                 eps: float = 1e-5) -> Tensor:
    """[N, prod(normalized_shape)]: each sample's gradient of a LayerNorm weight, the sum over its
    positions of grad_out * x_hat (samples on the first axis of both).

    Differentiable once, through PyTorch's fused LayerNorm backward: x_hat is formed for the sum
    and dropped, where the plain product would keep it for its backward (an activation's worth
    of memory per LayerNorm).
    """
    return _LayerNormWeightPerSample.apply(grad_out, x, tuple(normalized_shape), eps)


def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``F.layer_norm`` (same arguments, same values) with the fused backward and double backward of
    this module.

    ``backend``: ``"cpp"`` (the extension's CPU kernels), ``"torch"`` (the plain twins) or
    ``"auto"`` (cpp for CPU float32/float64 tensors, else ``F.layer_norm`` itself).
    A backward without a graph (first order) runs PyTorch's fused kernel in any case.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    routed = (len(shape) > 0 and input.dim() >= len(shape) and input.numel() > 0
              and tuple(input.shape[input.dim() - len(shape):]) == shape
              and not torch._C._are_functorch_transforms_active())
    if not routed or (backend != "torch" and _kernels(input, backend) is None):
        return F.layer_norm(input, normalized_shape, weight, bias, eps)  # (its own errors, too)
    return _LayerNorm.apply(input, list(shape), weight, bias, eps, backend)[0]
