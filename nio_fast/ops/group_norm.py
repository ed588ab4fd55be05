"""GroupNorm whose backward and double backward are two passes over the activations.

NIO differentiates through the backward pass, and PyTorch's GroupNorm pays for that: with a
graph to build, its backward becomes a composite of about forty elementwise ops, and the
double backward runs autograd over all of them (about 90 times the cost of the forward on a
[64, 16, 32, 32] activation, 2-core CPU). Here the backward is native_group_norm's fused
kernel's equal from the extension (``csrc/group_norm.cpp``), and its derivative a second fused
kernel (statistics pass, output pass); both are autograd Functions with vmap rules, so the
vmapped chunk gradients of NIO use them too. Forward, backward with graph and double backward
together: 1.5-2.2x faster than F.group_norm's (``benchmarks/test_group_norm.py``).

Affine gradients come out of the backward per sample ([N, C], summed by the caller): under
vmap over chunks each chunk's sum is then an ordinary sum over its samples.

The plain twins (:func:`group_norm_backward_reference`, :func:`group_norm_double_backward_reference`)
are PyTorch ops on statistics recomputed from x, so they are differentiable to any order: they
take a third derivative, and ``backend="torch"``. Where the fused kernels do not run (half
precision, no extension or Triton) ``group_norm`` is ``F.group_norm``, faster than the twins.
On CUDA the kernels are ``nio_fast/kernels/group_norm.py`` (Triton), tested under the interpreter;
not yet timed on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .. import availability
from .first_order import first_order

Tensor = torch.Tensor


def _grouped(t: Tensor, groups: int) -> Tensor:
    return t.reshape(t.shape[0], groups, -1)


def _statistics(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """x_hat [N, G, M] and rstd [N, G, 1], differentiable in x."""
    var, mean = torch.var_mean(_grouped(x, groups), dim=-1, keepdim=True, unbiased=False)
    rstd = (var + eps).rsqrt()
    return (_grouped(x, groups) - mean) * rstd, rstd


def _channelwise(t: Tensor, like: Tensor) -> Tensor:
    """[C] or [N, C] -> broadcastable against ``like`` [N, C, *]."""
    return t.reshape(*t.shape, *([1] * (like.dim() - 2)))


def _spatial_sum(t: Tensor) -> Tensor:
    """[N, C, *] -> [N, C] (a new tensor, also without spatial axes)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _project(z: Tensor, xhat: Tensor) -> Tensor:
    """P(z) = z - mean(z) - x_hat mean(x_hat z), over each group's last axis."""
    return z - z.mean(-1, keepdim=True) - xhat * (xhat * z).mean(-1, keepdim=True)


def group_norm_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], groups: int,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused backward: (grad_x, grad_weight [N, C], grad_bias [N, C]) per sample."""
    xhat, rstd = _statistics(x, groups, eps)
    a = grad_out * _channelwise(weight, x) if weight is not None else grad_out
    grad_x = (rstd * _project(_grouped(a, groups), xhat)).reshape_as(x)
    grad_weight = _spatial_sum(grad_out * xhat.reshape_as(x))
    grad_bias = _spatial_sum(grad_out)
    return grad_x, grad_weight, grad_bias


def group_norm_double_backward_reference(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], groups: int,
                                         eps: float, u: Optional[Tensor], p: Optional[Tensor],
                                         q: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Plain twin of the fused double backward: the VJP of :func:`group_norm_backward_reference`
    with cotangents u (like x), p and q ([N, C]); (d grad_out, d x, d weight per sample [N, C]).

    Written out (``csrc/group_norm.cpp`` has the derivation) rather than left to autograd, so it
    costs a few dozen elementwise ops; differentiable, for a third derivative.
    """
    xhat, rstd = _statistics(x, groups, eps)
    gamma = _channelwise(weight, x) if weight is not None else None
    a = _grouped(grad_out * gamma if gamma is not None else grad_out, groups)
    d_grad_out = torch.zeros_like(x)
    d_x = torch.zeros_like(_grouped(x, groups))
    d_weight = x.new_zeros(x.shape[:2])
    if u is not None:
        u_grouped = _grouped(u, groups)
        r_projected_u = (rstd * _project(u_grouped, xhat)).reshape_as(x)  # r P(u)
        d_grad_out = r_projected_u * gamma if gamma is not None else r_projected_u
        d_weight = _spatial_sum(r_projected_u * grad_out)
        mean_a_xhat = (a * xhat).mean(-1, keepdim=True)
        mean_u_xhat = (u_grouped * xhat).mean(-1, keepdim=True)
        t = (u_grouped * _project(a, xhat)).mean(-1, keepdim=True)  # mean(u P(a))
        w = -rstd * (u_grouped * mean_a_xhat + a * mean_u_xhat)
        d_x = d_x + rstd * _project(w, xhat) - t * rstd.square() * xhat
    if p is not None:
        p_wide = _channelwise(p, x)
        d_grad_out = d_grad_out + xhat.reshape_as(x) * p_wide
        d_x = d_x + rstd * _project(_grouped(grad_out * p_wide, groups), xhat)
    if q is not None:
        d_grad_out = d_grad_out + _channelwise(q, x)
    return d_grad_out, d_x.reshape_as(x), d_weight


BACKENDS = ("auto", "cpp", "triton", "torch")


def _kernels(x: Tensor, backend: str):
    """The module whose ``group_norm_backward`` / ``group_norm_double_backward`` run on ``x``
    (``availability.fused_kernels_for``), or None for the twins."""
    return availability.fused_kernels_for(x, backend, "group_norm", "nio_fast.kernels.group_norm")


def _batch_first(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """A vmapped tensor with its batch dimension first (an unbatched one expanded to it)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _merge(t: Tensor) -> Tensor:
    """[B, n, ...] -> [B * n, ...]: vmap over chunks is a batch of B * n samples for GroupNorm."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class _GroupNorm(Function):
    """(y, mean, rstd) of native_group_norm; backward through :class:`_GroupNormBackward`."""

    @staticmethod
    def forward(x, weight, bias, groups, eps, backend):
        n, c = x.shape[:2]
        return torch.native_group_norm(x, weight, bias, n, c, x.numel() // max(n * c, 1), groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, groups, eps, backend = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups, ctx.eps, ctx.backend = groups, eps, backend
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            # No graph to build (a first-order backward): PyTorch's own fused kernel, summed affine
            # gradients. (Ours returns them per sample, which vmap over chunks needs: 2x slower.)
            n, c = x.shape[:2]
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
                grad_out, x, mean, rstd, weight, n, c, x.numel() // max(n * c, 1), ctx.groups,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
            return grad_x, grad_weight, grad_bias, None, None, None
        grad_x, grad_weight, grad_bias = _GroupNormBackward.apply(grad_out, x, weight, mean, rstd, ctx.groups,
                                                                  ctx.eps, ctx.backend)
        return (grad_x, grad_weight.sum(0) if ctx.needs_input_grad[1] else None,
                grad_bias.sum(0) if ctx.needs_input_grad[2] else None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, groups, eps, backend):
        x = _batch_first(x, in_dims[0], info.batch_size)
        per_sample_affine = in_dims[1] is None and in_dims[2] is None
        y, mean, rstd = _GroupNorm.apply(_merge(x), weight if per_sample_affine else None,
                                         bias if per_sample_affine else None, groups, eps, backend)
        y = y.reshape(x.shape)
        if not per_sample_affine:  # affine parameters batched too: apply them to x_hat per batch entry
            affine_shape = (x.shape[0], 1, x.shape[2]) + (1,) * (x.dim() - 3)
            if weight is not None:
                y = y * _batch_first(weight, in_dims[1], info.batch_size).reshape(affine_shape)
            if bias is not None:
                y = y + _batch_first(bias, in_dims[2], info.batch_size).reshape(affine_shape)
        split = (x.shape[0], x.shape[1], groups)
        return (y, mean.reshape(split), rstd.reshape(split)), (0, 0, 0)


class _GroupNormBackward(Function):
    """(grad_x, grad_weight [N, C], grad_bias [N, C]) with a fused derivative."""

    @staticmethod
    def forward(grad_out, x, weight, mean, rstd, groups, eps, backend):
        kernels = _kernels(x, backend)
        if kernels is not None:
            return kernels.group_norm_backward(grad_out, x, mean, rstd, weight, groups)
        return group_norm_backward_reference(grad_out, x, weight, groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, mean, rstd, groups, eps, backend = inputs
        ctx.save_for_backward(grad_out, x, weight, mean, rstd)
        ctx.groups, ctx.eps, ctx.backend = groups, eps, backend

    @staticmethod
    def backward(ctx, u, p, q):
        grad_out, x, weight, mean, rstd = ctx.saved_tensors
        kernels = _kernels(x, ctx.backend)
        if kernels is not None and not torch.is_grad_enabled():
            d_grad_out, d_x, d_weight = kernels.group_norm_double_backward(grad_out, x, mean, rstd, weight,
                                                                           ctx.groups, u, p, q)
        else:  # another device or dtype, or a graph to build for a third derivative
            d_grad_out, d_x, d_weight = group_norm_double_backward_reference(grad_out, x, weight, ctx.groups,
                                                                             ctx.eps, u, p, q)
        return (d_grad_out, d_x, d_weight.sum(0) if ctx.needs_input_grad[2] else None, None, None, None, None,
                None)

    @staticmethod
    def vmap(info, in_dims, grad_out, x, weight, mean, rstd, groups, eps, backend):
        if in_dims[2] is not None:
            raise NotImplementedError("nio_fast group_norm: the backward under vmap takes unbatched affine "
                                      "weights (the forward applies batched ones to x_hat itself)")
        size = info.batch_size
        grad_out, x, mean, rstd = (_batch_first(t, d, size) for t, d in zip((grad_out, x, mean, rstd),
                                                                            (in_dims[0], in_dims[1], in_dims[3],
                                                                             in_dims[4])))
        grad_x, grad_weight, grad_bias = _GroupNormBackward.apply(_merge(grad_out), _merge(x), weight, _merge(mean),
                                                                  _merge(rstd), groups, eps, backend)
        split = x.shape[:2] + (x.shape[2],)
        return (grad_x.reshape(x.shape), grad_weight.reshape(split), grad_bias.reshape(split)), (0, 0, 0)


class _GroupNormWeightPerSample(Function):
    """sum over positions of grad_out * x_hat per sample and channel, without storing x_hat."""

    @staticmethod
    def forward(ctx, grad_out, x, groups, eps, kernels):
        n, c = x.shape[:2]
        _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x.numel() // max(n * c, 1), groups, eps)
        _, rows, _ = kernels.group_norm_backward(grad_out, x, mean, rstd, None, groups)
        ctx.save_for_backward(grad_out, x, mean, rstd)
        ctx.groups, ctx.kernels = groups, kernels
        return rows

    @staticmethod
    @first_order
    def backward(ctx, grad_rows):
        grad_out, x, mean, rstd = ctx.saved_tensors
        d_grad_out, d_x, _ = ctx.kernels.group_norm_double_backward(grad_out, x, mean, rstd, None, ctx.groups,
                                                                    None, grad_rows, None)
        return d_grad_out, d_x, None, None, None


def group_norm_weight_per_sample(grad_out: Tensor, x: Tensor, num_groups: int, eps: float = 1e-5, *,
                                 backend: str = "auto") -> Tensor:
    """[N, C]: each sample's gradient of a GroupNorm weight, sum over positions of grad_out * x_hat.

    Differentiable once. With the fused kernels it is one pass of the fused backward, and its
    derivative one of the double backward: x_hat (the size of the activation) is neither formed
    nor kept for the backward, as the plain product would keep it.
    """
    kernels = _kernels(x, backend)
    if kernels is None:
        x_hat = F.group_norm(x, num_groups, None, None, eps)
        return _spatial_sum(grad_out * x_hat)
    return _GroupNormWeightPerSample.apply(grad_out, x, num_groups, eps, kernels)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: str = "auto") -> Tensor:
    """``F.group_norm`` with the fused backward and double backward of this module (same values).

    ``backend``: ``"cpp"`` (the extension's CPU kernels), ``"triton"`` (CUDA; CPU tensors under
    TRITON_INTERPRET=1), ``"torch"`` (the plain twins) or ``"auto"`` (cpp for CPU, triton for
    CUDA fp32/fp64 tensors, else ``F.group_norm`` itself).
    A backward without a graph (first order) runs PyTorch's fused kernel in any case.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if not isinstance(num_groups, int) or input.dim() < 2 or num_groups <= 0 or input.shape[1] % num_groups:
        return F.group_norm(input, num_groups, weight, bias, eps)  # its own error message
    if backend != "torch" and _kernels(input, backend) is None:  # (a named backend raises if it cannot run)
        # No fused kernels for these tensors: the plain twins would run the second-order pass at
        # 0.3-0.4x PyTorch's speed (benchmarks/results/group_norm.md).
        return F.group_norm(input, num_groups, weight, bias, eps)
    return _GroupNorm.apply(input, weight, bias, num_groups, eps, backend)[0]
