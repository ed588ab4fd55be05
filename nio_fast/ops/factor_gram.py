"""Per-sample gradient Gram matrices from a layer's factors, differentiable (spec/GHOST.md).

For a Linear or unfolded convolution, sample ``i``'s weight gradient is
``g_i = sum_t B[i, t] (outer) A[i, t]`` (inputs ``A`` [N, T, d], output gradients ``B``
[N, T, p]); for an Embedding it is a scatter of ``B`` rows into the rows named by the token
ids. Sample-wise GradCosine needs ``G[i, j] = <g_i, g_j>`` inside the autograd graph, because
NIO differentiates it with respect to the weight scales. Two exact ways:

* ``"ghost"``: ``G_ij = sum_{t,s} (A_i A_j^T)[t, s] (B_i B_j^T)[t, s]``. Never forms a
  d x p tensor; costs ``N^2 T^2 (d + p)``. Pays when positions are few and layers wide.
* ``"materialize"``: build ``P_i = B_i^T A_i`` for a block of samples, reduce to ``P P^T``,
  free it. Costs ``N T d p + N^2 d p``. Pays when there are many positions (convolutions).

Memory: every temporary of the blocked forwards and backwards is kept under ``_BLOCK_BYTES``
(32 MiB, read at call time, so a test or a caller can lower it; ``block_bytes=`` overrides it
per call). No N x N x T x T tensor, no N x d x p tensor. The only exceptions are tensors of
one sample's or one pair's minimum size (a single ``T x d`` slice, one row of ``T`` kernel
entries), which cannot be split further without changing the formula's shape.

Autograd: the Functions save only their inputs (``A`` and ``B``; ``indices`` and ``B``) and
recompute the kernels blockwise in backward, so the graph holds nothing of size N^2 T^2 or
N d p between forward and backward. With ``S = dG + dG^T``:
ghost: ``dA_i = sum_j S_ij (B_i B_j^T) A_j``, ``dB_i = sum_j S_ij (A_i A_j^T) B_j``;
materialize: ``dP_i = sum_j S_ij P_j``, ``dA_i = B_i dP_i``, ``dB_i = A_i dP_i^T``.
Backward is first order (``first_order``: a derivative of it is refused): callers differentiate G once.

Accumulation: fp64 when the inputs are fp64, else fp32 (bf16 and fp16 inputs give an fp32
Gram); input gradients come back in the inputs' dtype.

Backends (ghost route only): ``"torch"`` is the blockwise code below; ``"triton"`` runs the
fused kernels of ``nio_fast.kernels.ghost_gram`` (the T x T pair kernels stay in registers,
forward and backward; the ``block_bytes`` budget does not apply, as they allocate nothing
beyond G, the pair list and the input gradients). The materialize route is matmul-shaped and
always runs on torch (cuBLAS / BLAS).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from .. import availability
from .first_order import first_order

_BLOCK_BYTES = 32 * 2 ** 20
"""Budget for one temporary (bytes). Read at call time; monkeypatch it to force splitting."""

_values = threading.local()


@contextlib.contextmanager
def gram_values_unused():
    """Inside (this thread), the factor-Gram Functions build their graphs but skip computing their
    values, returning zeros: for a caller that only differentiates them and has formed the values
    before (``nio_fast.samplewise.segments``: a recomputed segment's double backward)."""
    previous = getattr(_values, "unused", False)
    _values.unused = True
    try:
        yield
    finally:
        _values.unused = previous


def gram_values_wanted() -> bool:
    return not getattr(_values, "unused", False)


ROUTES = ("auto", "ghost", "materialize")
BACKENDS = ("auto", "triton", "torch")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _budget(block_bytes: Optional[int]) -> int:
    budget = _BLOCK_BYTES if block_bytes is None else block_bytes
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"block_bytes: expected a positive int, got {budget!r}")
    return budget


def _blocks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _upper_block_pairs(num: int, samples: int, load):
    """Pairs of sample blocks ``(i0, i1, loaded_i), (j0, j1, loaded_j)`` with j0 >= i0, where
    ``loaded = load(start, end)``; the diagonal pair shares one load. Every walk of a symmetric
    pairwise quantity (the Grams and their backwards) goes through here."""
    for i0, i1 in _blocks(num, samples):
        first = load(i0, i1)
        for j0, j1 in _blocks(num, samples):
            if j0 < i0:
                continue  # symmetric: the lower blocks mirror the upper ones
            yield (i0, i1, first), (j0, j1, first if j0 == i0 else load(j0, j1))


def _factor_rows(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, start: int, end: int):
    """One block of samples' factors in the accumulation dtype."""
    return a[start:end].to(acc), b[start:end].to(acc)


def _store_symmetric(gram: torch.Tensor, i0: int, i1: int, j0: int, j1: int, block: torch.Tensor) -> None:
    gram[i0:i1, j0:j1] = block
    if j0 != i0:
        gram[j0:j1, i0:i1] = block.T


# ---------------------------------------------------------------------------------------------
# Block plans: how many samples (and positions) one temporary may cover.

def _ghost_plan(num: int, positions: int, widest: int, itemsize: int, budget: int) -> tuple[int, int]:
    """(samples per block, positions of the row block per step) for the pairwise kernels.

    A block pair (I, J) with a row-position window of ``w`` holds kernels of
    ``|I| w |J| T`` entries; square sample blocks keep that under ``budget``. When even one
    pair's ``T x T`` kernel is too big, blocks are single samples and the row positions are
    windowed. Block slices of the inputs (cast to the accumulation dtype) stay under it too.
    """
    pair = positions * positions * itemsize
    if pair <= budget:
        samples = math.isqrt(budget // max(pair, 1))
        window = positions
    else:
        samples = 1
        window = budget // (positions * itemsize)
    samples = min(samples, budget // max(1, positions * widest * itemsize))
    return max(1, min(samples, num)), max(1, window)


def _materialize_plan(num: int, positions: int, in_features: int, out_features: int,
                      itemsize: int, budget: int) -> int:
    """Samples per block so that one block of per-sample gradients [n, p, d] (and the block's
    input slices) stays under ``budget``."""
    samples = min(budget // max(1, out_features * in_features * itemsize),
                  budget // max(1, positions * max(in_features, out_features) * itemsize))
    return max(1, min(samples, num))


# ---------------------------------------------------------------------------------------------
# The route choice.

@dataclass(frozen=True)
class OuterGramCost:
    """Multiply-add estimates for one layer's Gram, and the cheaper route.

    ``materialize_passes`` is how often each sample's per-sample gradient is rebuilt in the
    forward because the budget splits the samples into blocks (1 when they fit at once).
    """
    ghost_flops: float
    materialize_flops: float
    materialize_passes: float
    route: str

    @property
    def reason(self) -> str:
        return (f"{self.route}: ghost ~{self.ghost_flops:.3g} vs materialize ~{self.materialize_flops:.3g} "
                f"multiply-adds (materialize rebuilds each per-sample gradient {self.materialize_passes:g}x)")


def outer_gram_cost(num_samples: int, positions: int, in_features: int, out_features: int, *,
                    itemsize: int = 4, block_bytes: Optional[int] = None) -> OuterGramCost:
    """Estimate both routes for ``N`` samples of ``T`` positions, a ``p x d`` weight.

    ghost ~ ``N^2 T^2 (d + p)``; materialize ~ ``passes * N T d p + N^2 d p``. Both count the
    forward's multiply-adds with the same conventions (backward costs about twice each, so
    the ratio carries over). Ties go to ghost (it allocates less).
    """
    for name, value in (("num_samples", num_samples), ("positions", positions),
                        ("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    n, t, d, p = num_samples, positions, in_features, out_features
    per_block = _materialize_plan(n, t, d, p, itemsize, _budget(block_bytes))
    num_blocks = -(-n // per_block) if n else 1
    passes = (num_blocks + 1) / 2
    ghost = float(n) ** 2 * t * t * (d + p)
    materialize = passes * n * t * d * p + float(n) ** 2 * d * p
    return OuterGramCost(ghost, materialize, passes, "ghost" if ghost <= materialize else "materialize")


def outer_gram_route(num_samples: int, positions: int, in_features: int, out_features: int, *,
                     itemsize: int = 4, block_bytes: Optional[int] = None) -> str:
    """``"ghost"`` or ``"materialize"``: what ``route="auto"`` takes for these sizes.

    ``outer_gram_cost`` gives the two estimates behind the choice (to report it)."""
    return outer_gram_cost(num_samples, positions, in_features, out_features,
                           itemsize=itemsize, block_bytes=block_bytes).route


# ---------------------------------------------------------------------------------------------
# Ghost route.

def _row_major(factor: torch.Tensor) -> torch.Tensor:
    """[N, T, k] with rows contiguous: a convolution's patches arrive as unfold's [N, k, T]
    transposed, and every block's rows would otherwise be copied out of it again (four such
    copies were live at once in a GroupNorm ResNet-18's ghost backward: 42 MB at N = 64)."""
    return factor if factor.stride(-1) == 1 else factor.contiguous()


def _ghost_forward(a: torch.Tensor, b: torch.Tensor, budget: int) -> torch.Tensor:
    a, b = _row_major(a), _row_major(b)
    num, positions, d = a.shape
    p = b.shape[2]
    acc = _accumulation_dtype(a.dtype)
    gram = torch.zeros((num, num), dtype=acc, device=a.device)
    itemsize = torch.finfo(acc).bits // 8
    samples, window = _ghost_plan(num, positions, max(d, p), itemsize, budget)
    load = functools.partial(_factor_rows, a, b, acc)
    for (i0, i1, (a_i, b_i)), (j0, j1, (a_j, b_j)) in _upper_block_pairs(num, samples, load):
        if positions == 1:
            # Plain Linear: (A A^T) * (B B^T), elementwise.
            block = (a_i[:, 0] @ a_j[:, 0].T).mul_(b_i[:, 0] @ b_j[:, 0].T)
        else:
            block = torch.zeros((i1 - i0, j1 - j0), dtype=acc, device=a.device)
            a_cols, b_cols = a_j.reshape(-1, d).T, b_j.reshape(-1, p).T
            for t0, t1 in _blocks(positions, window):
                kernel = a_i[:, t0:t1].reshape(-1, d) @ a_cols
                kernel.mul_(b_i[:, t0:t1].reshape(-1, p) @ b_cols)
                block += kernel.view(i1 - i0, t1 - t0, j1 - j0, positions).sum((1, 3))
                del kernel
        _store_symmetric(gram, i0, i1, j0, j1, block)
    return gram


def _ghost_backward(a: torch.Tensor, b: torch.Tensor, sym: torch.Tensor, budget: int,
                    need_a: bool, need_b: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Recompute the pair kernels block by block; each (I, J) block with I < J feeds both
    ``dA_I`` and ``dA_J`` (S is symmetric), so the pairs are visited once."""
    a, b = _row_major(a), _row_major(b)
    num, positions, d = a.shape
    p = b.shape[2]
    acc = sym.dtype
    itemsize = torch.finfo(acc).bits // 8
    samples, window = _ghost_plan(num, positions, max(d, p), itemsize, budget)
    grad_a = torch.zeros(a.shape, dtype=acc, device=a.device) if need_a else None
    grad_b = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None
    load = functools.partial(_factor_rows, a, b, acc)
    for (i0, i1, (a_i, b_i)), (j0, j1, (a_j, b_j)) in _upper_block_pairs(num, samples, load):
        a_rows, b_rows = a_j.reshape(-1, d), b_j.reshape(-1, p)
        weights = sym[i0:i1, j0:j1].reshape(i1 - i0, 1, j1 - j0, 1)
        for t0, t1 in _blocks(positions, window):
            a_win = a_i[:, t0:t1].reshape(-1, d)
            b_win = b_i[:, t0:t1].reshape(-1, p)
            shape = (i1 - i0, t1 - t0, j1 - j0, positions)

            def add_mirrored(grad, kernel_win, kernel_rows, win, rows):
                """grad_i[t] += sum_{j,s} S_ij (k_it . k_js) x_js, and the mirror for j: x is A
                with the kernel of B, or B with the kernel of A."""
                w = kernel_win @ kernel_rows.T
                w.view(shape).mul_(weights)
                width = rows.shape[1]
                grad[i0:i1, t0:t1] += (w @ rows).view(i1 - i0, t1 - t0, width)
                if j0 != i0:
                    grad[j0:j1] += (w.T @ win).view(j1 - j0, positions, width)

            if need_a:
                add_mirrored(grad_a, b_win, b_rows, a_win, a_rows)
            if need_b:
                add_mirrored(grad_b, a_win, a_rows, b_win, b_rows)
    return grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# Materialize route.

def _per_sample(a_block: torch.Tensor, b_block: torch.Tensor) -> torch.Tensor:
    """``P_i = B_i^T A_i`` for a block: [n, p, d] flattened to [n, p * d]."""
    return torch.bmm(b_block.transpose(1, 2), a_block).reshape(a_block.shape[0], -1)


def _materialize_forward(a: torch.Tensor, b: torch.Tensor, budget: int) -> torch.Tensor:
    num, positions, d = a.shape
    p = b.shape[2]
    acc = _accumulation_dtype(a.dtype)
    gram = torch.zeros((num, num), dtype=acc, device=a.device)
    samples = _materialize_plan(num, positions, d, p, torch.finfo(acc).bits // 8, budget)
    load = lambda start, end: _per_sample(a[start:end].to(acc), b[start:end].to(acc))  # noqa: E731
    for (i0, i1, p_i), (j0, j1, p_j) in _upper_block_pairs(num, samples, load):
        _store_symmetric(gram, i0, i1, j0, j1, p_i @ p_j.T)
    return gram


def _materialize_backward(a: torch.Tensor, b: torch.Tensor, sym: torch.Tensor, budget: int,
                          need_a: bool, need_b: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    num, positions, d = a.shape
    p = b.shape[2]
    acc = sym.dtype
    samples = _materialize_plan(num, positions, d, p, torch.finfo(acc).bits // 8, budget)
    # The results are allocated once the first block's per-sample gradients are freed and
    # written in place (bmm's out=): with one block (the usual case) the peak holds P or the
    # results beside dP, not all of them and a bmm temporary (ViT in-projection: 7 MB, not 13).
    grad_a = grad_b = None
    for i0, i1 in _blocks(num, samples):
        a_i, b_i = a[i0:i1].to(acc), b[i0:i1].to(acc)
        grad_p = torch.zeros((i1 - i0, p * d), dtype=acc, device=a.device)
        for j0, j1 in _blocks(num, samples):
            p_j = _per_sample(a_i, b_i) if j0 == i0 else _per_sample(a[j0:j1].to(acc), b[j0:j1].to(acc))
            grad_p.addmm_(sym[i0:i1, j0:j1], p_j)  # dP_i = sum_j S_ij P_j
            del p_j
        grad_p = grad_p.view(i1 - i0, p, d)
        if need_a:
            grad_a = torch.empty(a.shape, dtype=acc, device=a.device) if grad_a is None else grad_a
            torch.bmm(b_i, grad_p, out=grad_a[i0:i1])                  # [n,T,p] @ [n,p,d]
        if need_b:
            grad_b = torch.empty(b.shape, dtype=acc, device=b.device) if grad_b is None else grad_b
            torch.bmm(a_i, grad_p.transpose(1, 2), out=grad_b[i0:i1])  # [n,T,d] @ [n,d,p]
        del grad_p
    return grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# The autograd.Function and the public op.

class _OuterGram(torch.autograd.Function):
    """Saves A and B only; backward recomputes kernels or per-sample gradients blockwise."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output_grads: torch.Tensor, route: str, budget: int,
                backend: str = "torch") -> torch.Tensor:
        ctx.save_for_backward(inputs, output_grads)
        ctx.route, ctx.budget, ctx.backend = route, budget, backend
        if not gram_values_wanted():
            num = inputs.shape[0]
            return inputs.new_zeros((num, num), dtype=_accumulation_dtype(inputs.dtype))
        if route == "ghost" and backend == "triton":
            return _ghost_kernels().ghost_gram_forward(inputs, output_grads)
        if route == "ghost":
            return _ghost_forward(inputs, output_grads, budget)
        return _materialize_forward(inputs, output_grads, budget)

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return None, None, None, None, None
        sym = (grad_gram + grad_gram.T).to(_accumulation_dtype(a.dtype))
        if ctx.route == "ghost" and ctx.backend == "triton":
            grad_a, grad_b = _ghost_kernels().ghost_gram_backward(a, b, sym, need_a, need_b)
        else:
            backward = _ghost_backward if ctx.route == "ghost" else _materialize_backward
            grad_a, grad_b = backward(a, b, sym, ctx.budget, need_a, need_b)
        return (grad_a.to(a.dtype) if need_a else None,
                grad_b.to(b.dtype) if need_b else None, None, None, None)


def _load_ghost_kernels() -> tuple[Optional[ModuleType], str]:
    return availability.optional_module("nio_fast.kernels.ghost_gram")


def _ghost_kernels() -> ModuleType:
    module, reason = _load_ghost_kernels()
    if module is None:
        raise RuntimeError(f"the Triton ghost kernels cannot be imported: {reason}")
    return module


def _ghost_backend(backend: str, inputs: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for the ghost route on ``inputs``; refuses an unusable ``"triton"``.

    ``"auto"``: Triton on CUDA tensors of a dtype the kernels take, when there is a position axis
    (T > 1). With T = 1 the pair kernels are 1 x 1 and torch's two matmuls are the right tool;
    on CPU the Triton interpreter is a test vehicle, never a default (as for ``ops.gram``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    device = inputs.device
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or inputs.shape[1] <= 1)):
        return "torch"  # decided without importing triton
    usable = availability.triton_usable(device)
    if backend == "triton":
        if not usable:
            raise ValueError(f"backend='triton' cannot run on {device}: {availability.backends()['triton']['reason']} "
                             f"(Triton takes CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); "
                             f"use backend='torch' or 'auto'")
        module, reason = _load_ghost_kernels()
        if module is None:
            raise ValueError(f"backend='triton': the ghost kernels cannot be imported ({reason})")
        if inputs.dtype not in module.SUPPORTED_DTYPES:
            raise ValueError(f"backend='triton': the ghost kernels take {module.SUPPORTED_DTYPES}, got {inputs.dtype}")
        return "triton"
    if not usable:
        return "torch"
    module, _ = _load_ghost_kernels()
    return "triton" if module is not None and inputs.dtype in module.SUPPORTED_DTYPES else "torch"


def _check_factors(inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
    for name, t in (("inputs", inputs), ("output_grads", output_grads)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-d tensor [N, T, features], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if output_grads.shape[:2] != inputs.shape[:2]:
        raise ValueError(f"output_grads: [N, T] = {tuple(output_grads.shape[:2])} differs from "
                         f"inputs' {tuple(inputs.shape[:2])}")
    _check_dtype_and_device(inputs, output_grads)


def _check_dtype_and_device(inputs: torch.Tensor, output_grads: torch.Tensor) -> None:
    """A layer's two factors share dtype and device (shared with ``pixel_gram``)."""
    if output_grads.dtype != inputs.dtype:
        raise TypeError(f"output_grads: dtype {output_grads.dtype} differs from inputs' {inputs.dtype}")
    if output_grads.device != inputs.device:
        raise ValueError(f"output_grads: on {output_grads.device}, but inputs are on {inputs.device}")


def outer_gram(inputs: torch.Tensor, output_grads: torch.Tensor, route: str = "auto", *,
               block_bytes: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` for ``g_i = sum_t B[i, t] (outer) A[i, t]``, differentiable.

    Args:
        inputs: ``A`` [N, T, d], the layer's inputs (unfolded patches for a convolution).
        output_grads: ``B`` [N, T, p], the gradients at the layer's outputs (taken with
            ``create_graph=True`` when G must be differentiated through them). Same N, T,
            dtype and device as ``inputs``. Scale out any 1/N of a mean loss first.
        route: ``"ghost"``, ``"materialize"`` (both exact) or ``"auto"``: the cheaper by
            ``outer_gram_cost`` (call it to report the choice).
        block_bytes: budget for one temporary; default ``_BLOCK_BYTES`` (32 MiB). Torch code only.
        backend: for the ghost route: ``"torch"`` (blockwise torch), ``"triton"`` (fused
            kernels; ``ValueError`` where Triton cannot run) or ``"auto"``: Triton for CUDA
            tensors with T > 1, else torch. The materialize route always runs on torch.

    Returns:
        [N, N], fp64 for fp64 inputs else fp32. Gradients flow to both ``inputs`` and
        ``output_grads`` (first order); the graph holds only ``inputs`` and ``output_grads``.
    """
    if route not in ROUTES:
        raise ValueError(f"route: expected one of {', '.join(map(repr, ROUTES))}; got {route!r}")
    _check_factors(inputs, output_grads)
    budget = _budget(block_bytes)
    if route == "auto":
        num, positions, d = inputs.shape
        itemsize = torch.finfo(_accumulation_dtype(inputs.dtype)).bits // 8
        route = outer_gram_route(num, positions, d, output_grads.shape[2], itemsize=itemsize, block_bytes=budget)
    chosen = _ghost_backend(backend, inputs)  # validated for either route: a bad backend fails early
    return _OuterGram.apply(inputs, output_grads, route, budget, chosen if route == "ghost" else "torch")


def outer_gram_reference(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """Plain twin: every per-sample gradient by einsum ([N, p, d] at once), then ``P P^T``.

    Ordinary autograd ops, so differentiable to any order; the memory the routes avoid."""
    _check_factors(inputs, output_grads)
    acc = _accumulation_dtype(inputs.dtype)
    per_sample = torch.einsum("ntp,ntd->npd", output_grads.to(acc), inputs.to(acc)).reshape(inputs.shape[0], -1)
    return per_sample @ per_sample.T


# ---------------------------------------------------------------------------------------------
# Embedding.

def _masked_rows(output_grads: torch.Tensor, indices: torch.Tensor, padding_idx: Optional[int],
                 acc: torch.dtype) -> torch.Tensor:
    rows = output_grads.to(acc)
    if padding_idx is not None:
        rows = rows.masked_fill(indices.eq(padding_idx).unsqueeze(-1), 0)
    return rows


def _embedding_rows(indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int],
                    acc: torch.dtype, start: int, end: int):
    """One block of samples' indices and masked output-gradient rows."""
    block = indices[start:end]
    return block, _masked_rows(output_grads[start:end], block, padding_idx, acc)


def _embedding_forward(indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int],
                       budget: int) -> torch.Tensor:
    num, positions, width = output_grads.shape
    acc = _accumulation_dtype(output_grads.dtype)
    gram = torch.zeros((num, num), dtype=acc, device=output_grads.device)
    samples, window = _ghost_plan(num, positions, width, torch.finfo(acc).bits // 8, budget)
    load = functools.partial(_embedding_rows, indices, output_grads, padding_idx, acc)
    for (i0, i1, (idx_i, b_i)), (j0, j1, (idx_j, b_j)) in _upper_block_pairs(num, samples, load):
        block = torch.zeros((i1 - i0, j1 - j0), dtype=acc, device=gram.device)
        cols, ids = b_j.reshape(-1, width).T, idx_j.reshape(1, -1)
        for t0, t1 in _blocks(positions, window):
            kernel = b_i[:, t0:t1].reshape(-1, width) @ cols
            kernel.masked_fill_(idx_i[:, t0:t1].reshape(-1, 1) != ids, 0)
            block += kernel.view(i1 - i0, t1 - t0, j1 - j0, positions).sum((1, 3))
            del kernel
        _store_symmetric(gram, i0, i1, j0, j1, block)
    return gram


def _embedding_backward(indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int],
                        sym: torch.Tensor, budget: int) -> torch.Tensor:
    """``dB_it = [idx_it != pad] sum_j S_ij sum_s [idx_it == idx_js] b_js`` (b_js zero at pad)."""
    num, positions, width = output_grads.shape
    acc = sym.dtype
    samples, window = _ghost_plan(num, positions, width, torch.finfo(acc).bits // 8, budget)
    grad = torch.zeros(output_grads.shape, dtype=acc, device=output_grads.device)
    load = functools.partial(_embedding_rows, indices, output_grads, padding_idx, acc)
    for (i0, i1, (idx_i, b_i)), (j0, j1, (idx_j, b_j)) in _upper_block_pairs(num, samples, load):
        rows, ids = b_j.reshape(-1, width), idx_j.reshape(1, -1)
        weights = sym[i0:i1, j0:j1].reshape(i1 - i0, 1, j1 - j0, 1)
        for t0, t1 in _blocks(positions, window):
            shape = (i1 - i0, t1 - t0, j1 - j0, positions)
            w = (idx_i[:, t0:t1].reshape(-1, 1) == ids).to(acc)
            w.view(shape).mul_(weights)
            grad[i0:i1, t0:t1] += (w @ rows).view(i1 - i0, t1 - t0, width)
            if j0 != i0:
                grad[j0:j1] += (w.T @ b_i[:, t0:t1].reshape(-1, width)).view(j1 - j0, positions, width)
            del w
    if padding_idx is not None:
        grad.masked_fill_(indices.eq(padding_idx).unsqueeze(-1), 0)
    return grad


class _EmbeddingGram(torch.autograd.Function):
    """Saves the indices and B only; backward recomputes the match kernels blockwise."""

    @staticmethod
    def forward(ctx, indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int],
                budget: int) -> torch.Tensor:
        ctx.save_for_backward(indices, output_grads)
        ctx.padding_idx, ctx.budget = padding_idx, budget
        return _embedding_forward(indices, output_grads, padding_idx, budget)

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        indices, b = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        sym = (grad_gram + grad_gram.T).to(_accumulation_dtype(b.dtype))
        grad = _embedding_backward(indices, b, ctx.padding_idx, sym, ctx.budget)
        return None, grad.to(b.dtype), None, None


def _check_embedding(indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int]) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a tensor, got {type(indices).__name__}")
    if not isinstance(output_grads, torch.Tensor):
        raise TypeError(f"output_grads: expected a tensor, got {type(output_grads).__name__}")
    if indices.dim() != 2:
        raise ValueError(f"indices: expected a 2-d tensor [N, T], got shape {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer tensor, got {indices.dtype}")
    if output_grads.dim() != 3:
        raise ValueError(f"output_grads: expected a 3-d tensor [N, T, E], got shape {tuple(output_grads.shape)}")
    if not output_grads.is_floating_point():
        raise TypeError(f"output_grads: expected a floating-point tensor, got {output_grads.dtype}")
    if output_grads.shape[:2] != indices.shape:
        raise ValueError(f"output_grads: [N, T] = {tuple(output_grads.shape[:2])} differs from "
                         f"indices' {tuple(indices.shape)}")
    if output_grads.device != indices.device:
        raise ValueError(f"output_grads: on {output_grads.device}, but indices are on {indices.device}")
    if padding_idx is not None and (not isinstance(padding_idx, int) or isinstance(padding_idx, bool)
                                    or padding_idx < 0):
        raise ValueError(f"padding_idx: expected None or a non-negative int (normalise a negative one "
                         f"with num_embeddings first), got {padding_idx!r}")


def embedding_gram(indices: torch.Tensor, output_grads: torch.Tensor, padding_idx: Optional[int] = None, *,
                   block_bytes: Optional[int] = None) -> torch.Tensor:
    """``G[i, j] = <g_i, g_j>`` for an Embedding weight, differentiable w.r.t. ``output_grads``.

    ``G_ij = sum_{t,s} [idx_it == idx_js] (b_it . b_js)``: only position pairs that hit the
    same row of the table meet, so the [N, V, E] per-sample gradients are never built.
    Positions whose index is ``padding_idx`` contribute nothing (PyTorch gives that row a zero
    gradient). Streamed over sample blocks under the same budget as ``outer_gram``.

    Args:
        indices: [N, T] integer token ids.
        output_grads: [N, T, E], gradients at the embedding's output.
        padding_idx: the table's padding row (non-negative), or None.
    """
    _check_embedding(indices, output_grads, padding_idx)
    return _EmbeddingGram.apply(indices, output_grads, padding_idx, _budget(block_bytes))


def embedding_gram_reference(indices: torch.Tensor, output_grads: torch.Tensor,
                             padding_idx: Optional[int] = None) -> torch.Tensor:
    """Plain twin: per-sample gradients [N, V, E] by ``index_add`` (V = max index + 1), Gram."""
    _check_embedding(indices, output_grads, padding_idx)
    num, positions, width = output_grads.shape
    acc = _accumulation_dtype(output_grads.dtype)
    vocab = int(indices.max()) + 1 if indices.numel() else 0
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError("indices: the reference needs non-negative token ids")
    rows = output_grads.to(acc)
    if padding_idx is not None:
        rows = rows * indices.ne(padding_idx).unsqueeze(-1).to(acc)
    slots = (torch.arange(num, device=indices.device).unsqueeze(1) * vocab + indices).reshape(-1)
    per_sample = rows.new_zeros((num * vocab, width)).index_add(0, slots, rows.reshape(-1, width))
    per_sample = per_sample.reshape(num, vocab * width)
    return per_sample @ per_sample.T
