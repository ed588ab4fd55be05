"""BatchNorm with batch statistics whose backward and double backward are two passes over the
activations.

NIO's exact mode on a BatchNorm model differentiates through D backward passes over the whole
batch, and PyTorch's BatchNorm pays for the second derivative with ``batchnorm_double_backward``,
a composite of about thirty elementwise ops and reductions: on a BatchNorm ResNet-20, batch 64,
D = 4 (2-core CPU, torch.profiler) it was 53% of the iteration. Here the backward is a fused
kernel of the extension (``csrc/batch_norm.cpp``) and its derivative a second one (statistics
pass, output pass), both autograd Functions; a backward without a graph runs PyTorch's own.

With ``second_order_only=True`` (NIO's iterations) the backward's graph keeps no ``grad_out``:
the double backward rebuilds it per element from the backward's own outputs, ``grad_x`` (which
the convolution before the BatchNorm keeps anyway) and the affine gradients (the chunk
gradients, kept anyway): ``gy = gx / (r gamma) + gb / M + x_hat gw / M``. That halves what each
chunk's graph adds in NIO's exact mode (a BatchNorm ResNet-20: 46 of 95 MB per chunk at batch
64). It needs a gamma without zeros or near-zeros (else ``grad_out`` is kept, as without the
flag) and gives up third derivatives (they raise).

Only the calls NIO makes are routed: training behaviour without running buffers
(``F.batch_norm(x, None, None, weight, bias, training=True)``), float32 / float64 on the CPU,
outside torch.func transforms. Everything else is ``F.batch_norm`` itself (CUDA included: no
GPU kernel yet).

The plain twins are GroupNorm's (``group_norm.py``): a channel's statistics over (N, *) are
those of one sample whose every channel is a group, so ``x.transpose(0, 1)`` as [1, C, N * HW]
with C groups turns one into the other.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .. import availability
from .group_norm import group_norm_backward_reference, group_norm_double_backward_reference

Tensor = torch.Tensor

BACKENDS = ("auto", "cpp", "torch")


def _as_groups(t: Tensor) -> Tensor:
    """[N, C, *] -> [1, C, N * HW]: one sample whose C channels are C groups."""
    return t.transpose(0, 1).reshape(1, t.shape[1], -1)


def _from_groups(t: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`_as_groups`."""
    return t.reshape(like.shape[1], like.shape[0], *like.shape[2:]).transpose(0, 1)


def _optional_row(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(1, -1)


def batch_norm_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor],
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused backward: (grad_x, grad_weight [C], grad_bias [C]); differentiable."""
    grad_x, grad_weight, grad_bias = group_norm_backward_reference(_as_groups(grad_out), _as_groups(x), weight,
                                                                   x.shape[1], eps)
    return _from_groups(grad_x, x), grad_weight[0], grad_bias[0]


def batch_norm_double_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], eps: float,
                                         u: Optional[Tensor], p: Optional[Tensor],
                                         q: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused double backward: the VJP of :func:`batch_norm_backward_reference` with
    cotangents u (like x), p and q ([C]); (d grad_out, d x, d weight [C]). Differentiable."""
    d_grad_out, d_x, d_weight = group_norm_double_backward_reference(
        _as_groups(grad_out), _as_groups(x), weight, x.shape[1], eps, None if u is None else _as_groups(u),
        _optional_row(p), _optional_row(q))
    return _from_groups(d_grad_out, x), _from_groups(d_x, x), d_weight[0]


def _kernels(x: Tensor, backend: str):
    return availability.cpu_kernels_for(x, backend, "batch_norm")


class _BatchNorm(Function):
    """(y, mean, rstd) of native_batch_norm with batch statistics; backward through
    :class:`_BatchNormBackward` when a graph is built."""

    @staticmethod
    def forward(x, weight, bias, eps, backend, second_order_only):
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps, backend, second_order_only = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps, ctx.backend, ctx.second_order_only = eps, backend, second_order_only
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not torch.is_grad_enabled():  # first order: no graph, nothing to fuse
            grad_x, grad_weight, grad_bias = _native_backward(grad_out, x, weight, mean, rstd, ctx.eps, needs[:3])
        else:
            grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(grad_out, x, weight, mean, rstd, ctx.eps,
                                                                      ctx.backend, ctx.second_order_only)
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, None, None, None)


def _native_backward(grad_out, x, weight, mean, rstd, eps, needed):
    """PyTorch's fused BatchNorm backward with batch statistics: (grad_x, grad_weight [C], grad_bias
    [C]), None where not ``needed``."""
    return torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, rstd, True, eps,
                                                     list(needed))


class _BatchNormBackward(Function):
    """(grad_x, grad_weight [C], grad_bias [C]) with a fused derivative."""

    @staticmethod
    def forward(grad_out, x, weight, mean, rstd, eps, backend, second_order_only):
        kernels = _kernels(x, backend)
        if kernels is None:  # the twins: differentiable end to end
            return batch_norm_backward_reference(grad_out, x, weight, eps)
        # Ours, not PyTorch's faster one: PyTorch's temporaries raised the exact mode's peak memory
        # (csrc/batch_norm.h has the numbers).
        return kernels.batch_norm_backward(grad_out, x, mean, rstd, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, mean, rstd, eps, backend, second_order_only = inputs
        kernels = _kernels(x, backend)
        ctx.rebuild_grad_out = (second_order_only and kernels is not None
                                and kernels.batch_norm_grad_out_rebuildable(weight))
        # Rebuilding: the outputs instead of grad_out (grad_x is what the layer before keeps anyway).
        ctx.save_for_backward(*(output if ctx.rebuild_grad_out else (grad_out,)), x, weight, mean, rstd)
        ctx.eps, ctx.backend = eps, backend

    @staticmethod
    def backward(ctx, u, p, q):
        *kept, x, weight, mean, rstd = ctx.saved_tensors
        kernels = _kernels(x, ctx.backend)
        if ctx.rebuild_grad_out:
            if torch.is_grad_enabled():
                raise RuntimeError("nio_fast batch_norm: second_order_only=True keeps no grad_out, so it has no "
                                   "third derivative; call ops.batch_norm without it")
            d_grad_out, d_x, d_weight = kernels.batch_norm_double_backward_from_grad_x(*kept, x, mean, rstd, weight,
                                                                                       u, p, q)
        elif kernels is not None and not torch.is_grad_enabled():
            d_grad_out, d_x, d_weight = kernels.batch_norm_double_backward(kept[0], x, mean, rstd, weight, u, p, q)
        else:  # the twins: no kernel here, or a graph to build for a third derivative
            d_grad_out, d_x, d_weight = batch_norm_double_backward_reference(kept[0], x, weight, ctx.eps, u, p, q)
        return d_grad_out, d_x, d_weight if ctx.needs_input_grad[2] else None, None, None, None, None, None


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, backend: str = "auto",
               second_order_only: bool = False) -> Tensor:
    """``F.batch_norm`` (same arguments, same values) whose batch-statistics case without running
    buffers has the fused backward and double backward of this module.

    ``backend``: ``"cpp"`` (the extension's CPU kernels), ``"torch"`` (the plain twins) or
    ``"auto"`` (cpp for CPU float32/float64 tensors, else ``F.batch_norm`` itself).
    A backward without a graph (first order) runs PyTorch's fused kernel in any case.
    ``second_order_only``: the backward's graph keeps no ``grad_out`` where the cpp kernels can
    rebuild it (module docstring); a third derivative then raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    routed = (training and running_mean is None and running_var is None and input.dim() >= 2
              and input.numel() > input.shape[1]  # F.batch_norm raises for one value per channel
              and not torch._C._are_functorch_transforms_active())
    if not routed or (backend != "torch" and _kernels(input, backend) is None):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _BatchNorm.apply(input, weight, bias, eps, backend, second_order_only)[0]
