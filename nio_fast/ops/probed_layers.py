"""Linear and convolution layers whose double backward gives each weight's scale gradient
without forming the weight's gradient.

NIO needs, per tensor, only s_p = <dJ/dtheta_p, theta0_p> = <dJ/dtheta_p, theta_p> / alpha_p
(theta_p = alpha_p theta0_p), never dJ/dtheta_p itself. For an op bilinear in its data u and
its weight W (a linear layer, a convolution), the part of <dJ/dW, W> that flows through one use
equals <dJ/du, u> for the cotangent the same use hands its data input, which the double backward
computes anyway (both are <c, B(u, W)> for the use's output cotangent c). A weight is used
twice per chunk: in the forward (y = B(x, W)) and, in the backward the chunk gradient comes from,
in the data gradient (grad_x = B*(dy, W)); the double backward would form a full weight-sized
gradient (one matmul or weight-gradient convolution) at each. Here each use takes a ``probe``, a
0-dim tensor of value 0 standing for theta -> (1 + probe) theta: a double backward asked for the
probes' gradients gets <dJ/dW, W> summed over the uses as two dot products of tensors it already
has, and skips the weight-sized products whenever the engine does not need the weight's own
gradient. Everything else is the plain layer: the same values, and a weight's gradient wherever
one is asked for (the chunk gradients of the Gram are exactly those).

The weight and the probe must reach these ops through a view each (``weight.view_as(weight)``):
whether the engine will use a gradient is known for the nodes of non-leaf tensors only
(``torch._C._will_engine_execute_node``), so the view is what tells a chunk backward, which
wants the weight's gradient and not the probe's, from NIO's double backward, which wants the
probe's and not the weight's.

Plain twins: autograd of ``F.linear`` / ``F.conv{1,2,3}d`` (``tests/test_scale_probes.py``
holds values, chunk gradients, probe gradients against <dJ/dW, W> and weight gradients equal).
Differentiable twice (their double backward is first order: ``first_order``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from .first_order import first_order

Tensor = torch.Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Private in PyTorch (torch.utils.checkpoint and torch.autograd.graph use it); without it every
# gradient is formed, as PyTorch's Python Functions do.
_WILL_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)


def _wanted(ctx, edge: int) -> bool:
    """Whether the engine running this backward will use the gradient of the ``edge``-th tensor
    input (``next_functions`` counts tensor inputs only): asked of that input's node (a view's,
    for the weight and the probe), as PyTorch's own nodes ask."""
    node = ctx.next_functions[edge][0]
    if node is None:
        return False
    if _WILL_EXECUTE is None or type(node).__name__ == "AccumulateGrad":  # a leaf: the engine cannot say
        return True
    return _WILL_EXECUTE(node)


def _probe_edge(bias: Optional[Tensor]) -> int:
    """The probe's edge among the tensor inputs (x, weight[, bias], probe)."""
    return 2 if bias is None else 3


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Linear: y = x W^T + b over the last axis; rows R = every leading position.


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _ProbedLinear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probe):
        ctx.save_for_backward(x, weight, probe)
        ctx.has_bias, ctx.probe_edge = bias is not None, _probe_edge(bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, probe = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[0], _wanted(ctx, 1), ctx.needs_input_grad[2]
        want_p = _wanted(ctx, ctx.probe_edge)
        if torch.is_grad_enabled():  # the chunk backward, with graph
            grad_x, grad_w, grad_b = _ProbedLinearBackward.apply(grad_out, x, weight, probe,
                                                                  (want_x or want_p, want_w, want_b))
        else:  # the double backward reaching the forward use: grad_out is the cotangent of y
            rows = _rows(grad_out)
            grad_x = (rows @ weight).view(x.shape) if want_x or want_p else None
            grad_w = rows.T @ _rows(x) if want_w else None
            grad_b = rows.sum(0) if want_b and ctx.has_bias else None
        grad_p = _dot(x, grad_x) if want_p else None
        return grad_x if want_x else None, grad_w, grad_b, grad_p


class _ProbedLinearBackward(Function):
    """(grad_x, grad_w, grad_b) of a linear layer; its backward gives the probe <dy, c_gx W^T>."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, probe, wanted):
        # The rows are what is saved: a transposed grad_out is copied into them once, not again
        # in the double backward (PyTorch's matmul keeps its folded 2-D operands the same way).
        rows, x_rows = _rows(grad_out), _rows(x)
        ctx.save_for_backward(rows, x_rows, weight, probe)
        ctx.shapes = grad_out.shape, x.shape
        want_x, want_w, want_b = wanted
        return ((rows @ weight).view(x.shape) if want_x else None, rows.T @ x_rows if want_w else None,
                rows.sum(0) if want_b else None)

    @staticmethod
    @first_order
    def backward(ctx, cot_x, cot_w, cot_b):
        rows, x_rows, weight, probe = ctx.saved_tensors
        grad_out_shape, x_shape = ctx.shapes
        part = _rows(cot_x) @ weight.T if cot_x is not None else None  # [R, out]: through grad_x = dy W
        d_p = _dot(rows, part) if part is not None and _wanted(ctx, 3) else None
        d_w = rows.T @ _rows(cot_x) if cot_x is not None and _wanted(ctx, 2) else None
        d_x = (rows @ cot_w).view(x_shape) if cot_w is not None and ctx.needs_input_grad[1] else None
        d_grad_out = part  # the other terms are added into it (a fresh tensor no one else holds)
        if cot_w is not None:
            d_grad_out = x_rows @ cot_w.T if d_grad_out is None else d_grad_out.addmm_(x_rows, cot_w.T)
        if cot_b is not None:
            d_grad_out = cot_b.expand_as(rows) if d_grad_out is None else d_grad_out.add_(cot_b)
        return (None if d_grad_out is None else d_grad_out.view(grad_out_shape), d_x, d_w, d_p, None)


def probed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], probe: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight also counts toward ``probe`` (see the module
    docstring); ``weight`` and ``probe`` are views of the parameter and of the probe leaf."""
    return _ProbedLinear.apply(x, weight, bias, probe)


# ---------------------------------------------------------------------------------------------
# Convolution (1-3 spatial dims), numeric stride / padding / dilation, any groups.


class ConvConfig:
    """The hyperparameters of one convolution call, as ``convolution_backward`` takes them."""

    __slots__ = ("dims", "stride", "padding", "dilation", "groups")

    def __init__(self, dims: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int):
        self.dims, self.stride, self.padding, self.dilation, self.groups = dims, stride, padding, dilation, groups

    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return _CONV[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_out: Tensor, x: Tensor, weight: Tensor, mask: Sequence[bool],
                 bias_channels: int) -> tuple:
        """(grad_x, grad_w, grad_b), None where ``mask`` says so (PyTorch 2.13's CPU convolution
        backward returns a [C_out, C_in, 1, k] grad_w for conv1d in float32 even when not asked)."""
        results = torch.ops.aten.convolution_backward(grad_out, x, weight, [bias_channels], self.stride,
                                                      self.padding, self.dilation, False, [0] * self.dims,
                                                      self.groups, list(mask))
        return tuple(result if wanted else None for result, wanted in zip(results, mask))


def _channels(bias_grad: Tensor, like: Tensor) -> Tensor:
    return bias_grad.view(1, -1, *([1] * (like.dim() - 2)))


class _ProbedConv(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, probe, config):
        ctx.save_for_backward(x, weight, probe)
        ctx.config, ctx.has_bias, ctx.probe_edge = config, bias is not None, _probe_edge(bias)
        return config.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, probe = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[0], _wanted(ctx, 1), ctx.needs_input_grad[2] and ctx.has_bias
        want_p = _wanted(ctx, ctx.probe_edge)
        mask = (want_x or want_p, want_w, want_b)
        if torch.is_grad_enabled():
            grad_x, grad_w, grad_b = _ProbedConvBackward.apply(grad_out, x, weight, probe, ctx.config, mask)
        else:
            grad_x, grad_w, grad_b = ctx.config.backward(grad_out, x, weight, mask, weight.shape[0])
        grad_p = _dot(x, grad_x) if want_p else None
        return grad_x if want_x else None, grad_w, grad_b, grad_p, None


class _ProbedConvBackward(Function):
    """(grad_x, grad_w, grad_b) of a convolution; its backward gives the probe <dy, conv(c_gx, W)>."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, probe, config, mask):
        ctx.save_for_backward(grad_out, x, weight, probe)
        ctx.config = config
        return tuple(config.backward(grad_out, x, weight, mask, weight.shape[0]))

    @staticmethod
    @first_order
    def backward(ctx, cot_x, cot_w, cot_b):
        grad_out, x, weight, probe = ctx.saved_tensors
        config = ctx.config
        part = config.conv(cot_x, weight) if cot_x is not None else None  # through grad_x = conv^T(dy, W)
        d_p = _dot(grad_out, part) if part is not None and _wanted(ctx, 3) else None
        d_w = (config.backward(grad_out, cot_x, weight, (False, True, False), 0)[1]
               if cot_x is not None and _wanted(ctx, 2) else None)
        d_x = (config.backward(grad_out, x, cot_w, (True, False, False), 0)[0]
               if cot_w is not None and ctx.needs_input_grad[1] else None)
        d_grad_out = part  # the other terms are added into it (a fresh tensor no one else holds)
        if cot_w is not None:
            through_w = config.conv(x, cot_w)
            d_grad_out = through_w if d_grad_out is None else d_grad_out.add_(through_w)
        if cot_b is not None:
            through_b = _channels(cot_b, grad_out)
            d_grad_out = through_b.expand_as(grad_out) if d_grad_out is None else d_grad_out.add_(through_b)
        return d_grad_out, d_x, d_w, d_p, None, None


def probed_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], probe: Tensor, config: ConvConfig) -> Tensor:
    """``F.conv{dims}d`` of ``config`` whose weight also counts toward ``probe`` (see
    :func:`probed_linear`)."""
    return _ProbedConv.apply(x, weight, bias, probe, config)
