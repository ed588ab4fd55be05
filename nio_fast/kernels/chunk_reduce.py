"""Triton kernels of the chunk reductions: products with a sparse R x N matrix W in CSR form.

W is given by ``offsets`` (int64 [R + 1]; row r's entries are a in [offsets[r], offsets[r + 1]),
offsets[0] = 0, nondecreasing), ``indices`` (int64 [nnz], the column of each entry, in [0, N)) and
``weights`` ([nnz], its value, in the data's dtype). A row may be empty; a column may appear in
several rows, or several times in one row.

* ``chunk_sandwich(M, ...)`` = W M W^T [R, R] for M [N, N]:
  ``out[r, s] = sum_{a in row r} w_a sum_{b in row s} w_b M[i_a, i_b]``, as two row sums
  (``L = W M``, then ``(W L^T)^T``).
* ``chunk_row_sums(V, ...)`` = W V [R, K] for V [N, K]: ``out[r, :] = sum_{a in row r} w_a V[i_a, :]``.
  Program (r, block of BLOCK_K columns) walks row r's entries one at a time (scalar index and
  weight loads) and adds the weighted row slice.

Each output element is summed by one program in a fixed order: deterministic, no atomics.
float32 and float64 only; sums run in the data's dtype. R (the number of chunks) is small, so one
program per output row (and column block) is enough parallelism.

M and V are read through their strides (no copies); the three row tensors are made contiguous
(they are small). The rows' contents (offsets from 0 to nnz, indices in range) are not checked:
that would need a device-to-host copy; out-of-range indices read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import _interpreting

__all__ = ["SUPPORTED_DTYPES", "chunk_row_sums", "chunk_sandwich"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# Block sizes (powers of two) and warps. Not timed on a GPU yet (none was available when written).
# Row sums: BLOCK_K contiguous columns per program (long, coalesced row reads); narrower V
# shrinks it.
_ROW_SUMS_BLOCK_K = 512
_NUM_WARPS = 4


@triton.jit
def _chunk_row_sums_kernel(
    values_ptr,  # [N, K], any strides
    offsets_ptr,  # int64 [R + 1]
    indices_ptr,  # int64 [nnz]
    weights_ptr,  # [nnz], the values' dtype
    out_ptr,  # [R, K] contiguous, the values' dtype
    K,
    stride_vn, stride_vk,
    BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_ok = cols < K
    begin = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    acc = tl.zeros([BLOCK_K], dtype=out_ptr.dtype.element_ty)
    for a in range(begin, end):
        index = tl.load(indices_ptr + a)
        weight = tl.load(weights_ptr + a)
        row = tl.load(values_ptr + index * stride_vn + cols * stride_vk, mask=cols_ok, other=0.0)
        acc += weight * row
    tl.store(out_ptr + r * K + cols, acc, mask=cols_ok)


# ---------------------------------------------------------------------------------------------
# Host side.

def _check(fn: str, data: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if data.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: the Triton kernels take one of {SUPPORTED_DTYPES}, got {data.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
        raise ValueError(f"{fn}: offsets must be a 1-d int64 tensor [R + 1], "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"{fn}: indices must be a 1-d int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if weights.dim() != 1 or weights.shape != indices.shape:
        raise ValueError(f"{fn}: weights must be 1-d with {indices.numel()} entries (one per index), "
                         f"got {tuple(weights.shape)}")
    if weights.dtype != data.dtype:
        raise TypeError(f"{fn}: weights have dtype {weights.dtype} but the data {data.dtype}")
    for name, t in (("offsets", offsets), ("indices", indices), ("weights", weights)):
        if t.device != data.device:
            raise ValueError(f"{fn}: {name} on {t.device} but the data on {data.device}")
    # Raw pointers: host memory under the interpreter, device memory otherwise.
    if _interpreting() and data.device.type != "cpu":
        raise RuntimeError(f"{fn}: under TRITON_INTERPRET the chunk kernels take CPU tensors, got {data.device}")
    if not _interpreting() and data.device.type != "cuda":
        raise RuntimeError(f"{fn}: the Triton chunk kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                           f"got {data.device}")


def chunk_sandwich(matrix: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """``W M W^T`` [R, R] (the matrix's dtype) of ``matrix`` M [N, N] and the CSR rows of W, as two
    row reductions: ``L = W M`` [R, N], then ``(W L^T)^T`` (L^T read through its strides):
    nnz (N + R) multiply-adds over whole rows, where pairing entries costs nnz^2 gathers."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"chunk_sandwich: matrix must be square [N, N], got {tuple(matrix.shape)}")
    _check("chunk_sandwich", matrix, offsets, indices, weights)
    left = chunk_row_sums(matrix, offsets, indices, weights)
    return chunk_row_sums(left.T, offsets, indices, weights).T.contiguous()


def chunk_row_sums(values: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """``W V`` [R, K] (the values' dtype) of ``values`` V [N, K] and the CSR rows of W."""
    if values.dim() != 2:
        raise ValueError(f"chunk_row_sums: values must be 2-d [N, K], got {tuple(values.shape)}")
    _check("chunk_row_sums", values, offsets, indices, weights)
    num_rows = offsets.numel() - 1
    k = values.shape[1]
    if num_rows == 0 or k == 0 or indices.numel() == 0:
        return torch.zeros((num_rows, k), dtype=values.dtype, device=values.device)
    out = torch.empty((num_rows, k), dtype=values.dtype, device=values.device)
    block_k = min(_ROW_SUMS_BLOCK_K, triton.next_power_of_2(k))
    grid = (num_rows, triton.cdiv(k, block_k))
    _chunk_row_sums_kernel[grid](
        values, offsets.contiguous(), indices.contiguous(), weights.contiguous(), out, k, *values.stride(),
        BLOCK_K=block_k, num_warps=_NUM_WARPS)
    return out
