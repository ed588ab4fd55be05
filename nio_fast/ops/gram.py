"""The Gram matrix of D gradients, each a list of P tensors, as a differentiable op.

``G[i, j] = sum_p <g[i][p], g[j][p]>``. Its backward hands tensor ``g[d][p]`` the gradient
``sum_j S[d, j] g[j][p]`` with ``S = dG + dG^T``.

The fused backends (Triton, the C++/CUDA extension) read every gradient once, in place, and
write the backward straight into per-tensor outputs: nothing of size D x m is allocated. The
``"torch"`` backend is the plain reference (flatten, concatenate, matmul); it is built from
ordinary autograd ops, so it is differentiable to any order and independent of the others.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .. import availability

GradTable = list[list[torch.Tensor]]
"""``grads[d][p]``: D lists of P tensors."""

GradsInput = Union[Sequence[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def accumulation_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 when any gradient is fp64, else fp32 (also for fp16/bf16 gradients)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_grad_table(grads: GradsInput, arg: str = "grads") -> GradTable:
    """Normalise either accepted layout to ``grads[d][p]`` and check it.

    Layouts: D lists of P tensors (what D autograd calls return), or P tensors with leading
    dimension D (what a vmap over chunks returns; unbound into views, no copy).
    """
    grads = list(grads)
    if not grads:
        raise ValueError(f"{arg}: expected at least one gradient, got an empty sequence")
    if all(isinstance(t, torch.Tensor) for t in grads):
        depth = grads[0].dim() and grads[0].shape[0]
        for p, t in enumerate(grads):
            if t.dim() == 0 or t.shape[0] != depth:
                raise ValueError(
                    f"{arg}: in the stacked layout every tensor needs the same leading dimension D; "
                    f"tensor 0 has D={depth}, tensor {p} has shape {tuple(t.shape)}")
        table = [list(column) for column in zip(*(t.unbind(0) for t in grads))]
    else:
        table = [list(row) for row in grads]
    num_tensors = len(table[0])
    for d, row in enumerate(table):
        if len(row) != num_tensors:
            raise ValueError(f"{arg}: gradient 0 has {num_tensors} tensors but gradient {d} has {len(row)}")
        for p, tensor in enumerate(row):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{arg}[{d}][{p}]: expected a tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise TypeError(f"{arg}[{d}][{p}]: expected a floating-point tensor, got {tensor.dtype}")
            reference = table[0][p]
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                raise ValueError(
                    f"{arg}[{d}][{p}]: shape {tuple(tensor.shape)} / {tensor.dtype} differs from "
                    f"{arg}[0][{p}]: {tuple(reference.shape)} / {reference.dtype}")
            if tensor.device != table[0][0].device:
                raise ValueError(f"{arg}[{d}][{p}]: on {tensor.device}, but {arg}[0][0] is on {table[0][0].device}")
    return table


# ---------------------------------------------------------------------------------------------
# The plain reference.

def gram_reference(table: GradTable) -> torch.Tensor:
    """Flatten, concatenate, matmul: allocates the D x m matrix the fused paths avoid."""
    dtype = accumulation_dtype([t for row in table for t in row])
    stacked = torch.stack([
        torch.cat([t.reshape(-1).to(dtype) for t in row]) if row else torch.zeros(0, dtype=dtype)
        for row in table])
    return stacked @ stacked.T


def _backward_reference(table: GradTable, weights: torch.Tensor) -> GradTable:
    """The Gram's backward, dL/dg_d = sum_k W[d, k] g_k with W = dG + dG^T, in differentiable
    torch ops (one [D, D] x [D, size] product per tensor)."""
    columns = []
    for tensors in zip(*table):
        stacked = torch.stack(tensors).reshape(len(tensors), -1).to(weights.dtype)
        columns.append([row.view(tensors[0].shape).to(tensors[0].dtype) for row in weights @ stacked])
    return [list(row) for row in zip(*columns)]


# ---------------------------------------------------------------------------------------------
# The fused backends behind one autograd.Function.

def _fused_forward(backend: str, table: GradTable) -> torch.Tensor:
    if backend == "triton":
        return availability.triton_kernels().gram_forward(table)
    return availability.extension().gram_forward(table)


def _fused_backward(backend: str, table: GradTable, weights: torch.Tensor) -> GradTable:
    if backend == "triton":
        return availability.triton_kernels().gram_backward(table, weights)
    return availability.extension().gram_backward(table, weights)


class _FusedGram(torch.autograd.Function):
    """Gram forward/backward on a fused backend. Inputs arrive flattened d-major."""

    @staticmethod
    def forward(ctx, backend: str, num_grads: int, num_tensors: int, *flat: torch.Tensor) -> torch.Tensor:
        table = [list(flat[d * num_tensors:(d + 1) * num_tensors]) for d in range(num_grads)]
        ctx.backend, ctx.num_grads, ctx.num_tensors = backend, num_grads, num_tensors
        ctx.save_for_backward(*flat)
        return _fused_forward(backend, table)

    @staticmethod
    def backward(ctx, grad_gram: torch.Tensor):
        flat = ctx.saved_tensors
        if not any(ctx.needs_input_grad[3:]):
            return (None, None, None) + (None,) * len(flat)
        n = ctx.num_tensors
        table = [list(flat[d * n:(d + 1) * n]) for d in range(ctx.num_grads)]
        weights = grad_gram + grad_gram.T
        if torch.is_grad_enabled():  # a graph to build: a third derivative of GradCosine goes through it
            outputs = _backward_reference(table, weights)
        else:
            outputs = _fused_backward(ctx.backend, table, weights)
        return (None, None, None) + tuple(t for row in outputs for t in row)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to this device's best backend; refuse one that cannot run here."""
    if backend == "auto":
        return availability.default_backend(device)
    if backend not in availability.BACKEND_NAMES:
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, availability.BACKEND_NAMES))}; got {backend!r}")
    if backend == "triton" and not availability.triton_usable(device):
        raise RuntimeError(f"backend='triton' cannot run on {device}: {availability.backends()['triton']['reason']}")
    if backend == "cpp" and not availability.cpp_usable(device):
        raise RuntimeError(f"backend='cpp' cannot run on {device}: {availability.backends()['cpp']['reason']}")
    return backend


def gram(grads: GradsInput, *, backend: str = "auto") -> torch.Tensor:
    """The D x D Gram matrix of D gradients, differentiable.

    Args:
        grads: D lists of P tensors (``grads[d][p]``), or P tensors with leading dimension D.
            Any shapes; fp16, bf16, fp32 or fp64 (may differ between tensors); contiguous or not.
        backend: ``"auto"`` (Triton on CUDA, else the C++ extension, else torch), ``"triton"``,
            ``"cpp"`` or ``"torch"``.

    Returns:
        ``G`` of shape [D, D]: fp32 (accumulated in fp32), fp64 when any gradient is fp64.
        Backward gives ``g[d][p]`` the gradient ``sum_j (dG + dG^T)[d, j] g[j][p]``.
    """
    table = as_grad_table(grads)
    chosen = resolve_backend(backend, table[0][0].device if table[0] else torch.device("cpu"))
    if chosen == "torch" or not table[0]:
        return gram_reference(table)
    flat = [t for row in table for t in row]
    return _FusedGram.apply(chosen, len(table), len(table[0]), *flat)
