"""Fused Triton kernels for the ghost route of ``outer_gram`` (see ``nio_fast.ops.factor_gram``).

For inputs ``A`` [N, T, d] and output gradients ``B`` [N, T, p] of a layer,

    G[i, j] = sum_{t,s} (A_i A_j^T)[t, s] * (B_i B_j^T)[t, s].

The T x T pair kernels ``A_i A_j^T`` and ``B_i B_j^T`` never go to memory: a program computes one
``BLOCK_T x BLOCK_S`` tile of both with ``tl.dot`` over chunks of ``BLOCK_K`` features, uses it
in registers and moves on.

* forward: one program per pair ``i <= j`` (the pair list comes from the host); the program sums
  ``ka * kb`` over all (t, s) tiles into one value; the host mirrors it to ``G[j, i]``. Each
  program writes its own slot: deterministic, no atomics.
* backward: with ``S = dG + dG^T``, ``dA_i = sum_j S_ij (B_i B_j^T) A_j`` and
  ``dB_i = sum_j S_ij (A_i A_j^T) B_j``. One program per (sample i, tile of t, tile of output
  columns) loops over every j and s-tile, recomputes the kernel tiles and accumulates
  ``(S_ij kb) @ A_j[s-tile, columns]`` (and ``(S_ij ka) @ B_j[s-tile, columns]``) in registers;
  dA and dB come out of the same pass, so each kernel tile serves both. A pair's tiles are
  recomputed from both sides (program i and program j): twice the torch route's pair work in
  exchange for no atomics and no N x N x T x T traffic.

Precision: tl.dot with ``input_precision="ieee"`` (no TF32). fp32 inputs: fp32 math and
accumulation. fp64 inputs: fp64 tl.dot and accumulation (Triton lowers fp64 dots to DMMA on
sm_80+ and supports them in the interpreter), so fp64 needs no torch fallback. fp16/bf16
inputs: the kernel-tile dots take the 16-bit operands (their products are exact in fp32) and
accumulate in fp32; the backward's second product (kernel tile times A_j or B_j) runs in fp32
on upcast operands, so the kernel tile is never rounded to 16 bits. Under the interpreter bf16
is upcast to fp32 first (numpy has no bf16), as in ``nio_fast.kernels.gram``.

Inputs are read through their strides (no copies); outputs are contiguous in the
accumulation dtype; the autograd layer casts them back.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .gram import _TORCH_TO_TRITON, _dot_dtype, _interpreting

__all__ = ["SUPPORTED_DTYPES", "ghost_gram_backward", "ghost_gram_forward", "forward_config", "backward_config"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Block sizes (powers of two, >= 16: tl.dot needs 16 x 16 x 16 at least) and warps, per kind of
# input: (tile of t and s, feature chunk K, warps) for the forward; (tile of t and s, feature
# chunk K, output width cap, warps) for the backward. Not timed on a GPU yet (none was available
# when written); chosen so that the sm_90 compile (tests/test_triton_ghost_gram.py prints ptxas'
# registers and stack) spills nothing at the largest tiles, while keeping tiles big:
# * forward: a program holds three [TILE, TILE] tiles (ka, kb, running sum) and two
#   [TILE, K] operand tiles; each operand element feeds TILE / 2 multiply-adds per chunk. An fp32
#   or fp64 ("ieee") tl.dot runs on FMA units with its operands whole in registers, so those
#   take a shorter K (as in kernels/gram.py); fp64 values take two registers, hence half tiles.
# * backward: a program holds its [TILE, WIDTH] output tiles for dA and dB and the two kernel
#   tiles. WIDTH caps how much of d (and p) one program covers: wider layers get more programs
#   along the column axis, each recomputing the kernel tiles (cost factor ceil(d / WIDTH)).
# Smaller T, d, p shrink the tiles to the next power of two (at least 16).
_FORWARD = {"16bit": (64, 32, 8), "fp32": (64, 16, 8), "fp64": (32, 16, 8)}
_BACKWARD = {"16bit": (64, 32, 128, 8), "fp32": (32, 32, 128, 8), "fp64": (32, 16, 64, 8)}


@triton.jit
def _pair_tile(ptr, sample_i, sample_j, t, t_ok, s, s_ok, width, stride_n, stride_t, stride_f,
               DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """``X_i[t-tile] @ X_j[s-tile]^T`` ([BLOCK_T, BLOCK_S], ACC_DTYPE) over all ``width`` features.

    Rows and columns outside T, and features outside ``width``, load as zero.
    """
    k = tl.arange(0, BLOCK_K)
    row_base = ptr + sample_i * stride_n + t[:, None] * stride_t
    col_base = ptr + sample_j * stride_n + s[None, :] * stride_t
    acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=ACC_DTYPE)
    for k0 in range(0, width, BLOCK_K):
        features = k0 + k
        features_ok = features < width
        x = tl.load(row_base + features[None, :] * stride_f, mask=t_ok[:, None] & features_ok[None, :], other=0.0)
        y = tl.load(col_base + features[:, None] * stride_f, mask=features_ok[:, None] & s_ok[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _ghost_forward_kernel(
    a_ptr, b_ptr,  # A [N, T, d], B [N, T, p], any strides
    pair_i_ptr, pair_j_ptr,  # int32 [num_pairs]: the pairs i <= j
    out_ptr,  # ACC_DTYPE [num_pairs]
    T, D, P,
    stride_an, stride_at, stride_ad,
    stride_bn, stride_bt, stride_bp,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    i = tl.load(pair_i_ptr + pair).to(tl.int64)
    j = tl.load(pair_j_ptr + pair).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    total = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + lanes
        t_ok = t < T
        for s0 in range(0, T, BLOCK_T):
            s = s0 + lanes
            s_ok = s < T
            ka = _pair_tile(a_ptr, i, j, t, t_ok, s, s_ok, D, stride_an, stride_at, stride_ad,
                            DOT_DTYPE, ACC_DTYPE, BLOCK_T, BLOCK_T, BLOCK_K)
            kb = _pair_tile(b_ptr, i, j, t, t_ok, s, s_ok, P, stride_bn, stride_bt, stride_bp,
                            DOT_DTYPE, ACC_DTYPE, BLOCK_T, BLOCK_T, BLOCK_K)
            total += ka * kb
    tl.store(out_ptr + pair, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _ghost_backward_kernel(
    a_ptr, b_ptr,  # A [N, T, d], B [N, T, p], any strides
    s_ptr,  # ACC_DTYPE [N, N] contiguous: S = dG + dG^T
    grad_a_ptr, grad_b_ptr,  # ACC_DTYPE [N, T, d] and [N, T, p], contiguous
    N, T, D, P,
    stride_an, stride_at, stride_ad,
    stride_bn, stride_bt, stride_bp,
    DOT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    NEED_A: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WIDTH_A: tl.constexpr,
    WIDTH_B: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    column_tile = tl.program_id(2)
    cols_a = column_tile * WIDTH_A + tl.arange(0, WIDTH_A)
    cols_a_ok = cols_a < D
    cols_b = column_tile * WIDTH_B + tl.arange(0, WIDTH_B)
    cols_b_ok = cols_b < P
    lanes = tl.arange(0, BLOCK_T)
    grad_a = tl.zeros([BLOCK_T, WIDTH_A], dtype=ACC_DTYPE)
    grad_b = tl.zeros([BLOCK_T, WIDTH_B], dtype=ACC_DTYPE)
    for j32 in range(0, N):
        j = tl.cast(j32, tl.int64)  # a plain int under the interpreter
        weight = tl.load(s_ptr + i * N + j)
        for s0 in range(0, T, BLOCK_T):
            s = s0 + lanes
            s_ok = s < T
            if NEED_A:  # dA_i[t] += S_ij sum_s (b_it . b_js) a_js
                kb = _pair_tile(b_ptr, i, j, t, t_ok, s, s_ok, P, stride_bn, stride_bt, stride_bp,
                                DOT_DTYPE, ACC_DTYPE, BLOCK_T, BLOCK_T, BLOCK_K)
                a_j = tl.load(a_ptr + j * stride_an + s[:, None] * stride_at + cols_a[None, :] * stride_ad,
                              mask=s_ok[:, None] & cols_a_ok[None, :], other=0.0)
                grad_a = tl.dot(kb * weight, a_j.to(ACC_DTYPE), grad_a, input_precision="ieee", out_dtype=ACC_DTYPE)
            if NEED_B:  # dB_i[t] += S_ij sum_s (a_it . a_js) b_js
                ka = _pair_tile(a_ptr, i, j, t, t_ok, s, s_ok, D, stride_an, stride_at, stride_ad,
                                DOT_DTYPE, ACC_DTYPE, BLOCK_T, BLOCK_T, BLOCK_K)
                b_j = tl.load(b_ptr + j * stride_bn + s[:, None] * stride_bt + cols_b[None, :] * stride_bp,
                              mask=s_ok[:, None] & cols_b_ok[None, :], other=0.0)
                grad_b = tl.dot(ka * weight, b_j.to(ACC_DTYPE), grad_b, input_precision="ieee", out_dtype=ACC_DTYPE)
    row = i * T + t
    if NEED_A:
        tl.store(grad_a_ptr + row[:, None] * D + cols_a[None, :], grad_a, mask=t_ok[:, None] & cols_a_ok[None, :])
    if NEED_B:
        tl.store(grad_b_ptr + row[:, None] * P + cols_b[None, :], grad_b, mask=t_ok[:, None] & cols_b_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side.

def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(extent: int, cap: int) -> int:
    """Next power of two >= extent, at least 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(1, extent))))


def _kind(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "16bit")


def forward_config(positions: int, in_features: int, out_features: int, dtype: torch.dtype) -> dict:
    """Launch constants of the forward kernel for these sizes (also used by the compile test)."""
    tile, chunk, warps = _FORWARD[_kind(dtype)]
    block_t = _tile(positions, tile)
    # Small tiles (short sequences) get 4 warps: 8 would leave most threads without elements.
    return {"BLOCK_T": block_t, "BLOCK_K": _tile(max(in_features, out_features), chunk),
            "num_warps": warps if block_t >= 32 else 4}


def backward_config(positions: int, in_features: int, out_features: int, dtype: torch.dtype) -> dict:
    """Launch constants of the backward kernel for these sizes (also used by the compile test)."""
    tile, chunk, width, warps = _BACKWARD[_kind(dtype)]
    block_t = _tile(positions, tile)
    width_a, width_b = _tile(in_features, width), _tile(out_features, width)
    return {"BLOCK_T": block_t, "BLOCK_K": _tile(max(in_features, out_features), chunk),
            "WIDTH_A": width_a, "WIDTH_B": width_b,
            "num_warps": warps if block_t * (width_a + width_b) >= 2048 else 4}


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"expected A [N, T, d] and B [N, T, p], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the ghost kernels take one of {SUPPORTED_DTYPES} for both factors, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"A on {a.device} but B on {b.device}")
    # Raw pointers: host memory under the interpreter, device memory otherwise.
    if _interpreting() and a.device.type != "cpu":
        raise RuntimeError(f"under TRITON_INTERPRET the ghost kernels take CPU tensors, got {a.device}")
    if not _interpreting() and a.device.type != "cuda":
        raise RuntimeError(f"the Triton ghost kernels need CUDA tensors (or TRITON_INTERPRET=1), got {a.device}")


def ghost_gram_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G`` [N, N] (fp64 for fp64 inputs, else fp32) of ``A`` [N, T, d], ``B`` [N, T, p]."""
    _check(a, b)
    num, positions, d = a.shape
    p = b.shape[2]
    acc = _accumulation_dtype(a.dtype)
    gram = torch.zeros((num, num), dtype=acc, device=a.device)
    if num == 0 or positions == 0 or d == 0 or p == 0:
        return gram
    pairs = torch.triu_indices(num, num, device=a.device).to(torch.int32)
    out = torch.empty(pairs.shape[1], dtype=acc, device=a.device)
    config = forward_config(positions, d, p, a.dtype)
    _ghost_forward_kernel[(pairs.shape[1],)](
        a, b, pairs[0], pairs[1], out, positions, d, p, *a.stride(), *b.stride(),
        DOT_DTYPE=_dot_dtype(a.dtype), ACC_DTYPE=_TORCH_TO_TRITON[acc], **config)
    rows, cols = pairs.long()
    gram[rows, cols] = out
    gram[cols, rows] = out
    return gram


def ghost_gram_backward(a: torch.Tensor, b: torch.Tensor, sym: torch.Tensor, need_a: bool = True,
                        need_b: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dA, dB)`` for ``S = sym`` (= dG + dG^T, [N, N]); each None when not needed.

    Outputs are contiguous, in the accumulation dtype (fp64 for fp64 inputs, else fp32).
    """
    _check(a, b)
    num, positions, d = a.shape
    p = b.shape[2]
    acc = _accumulation_dtype(a.dtype)
    if tuple(sym.shape) != (num, num):
        raise ValueError(f"sym: expected [{num}, {num}], got {tuple(sym.shape)}")
    grad_a = torch.zeros(a.shape, dtype=acc, device=a.device) if need_a else None
    grad_b = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None
    if not (need_a or need_b) or a.numel() == 0 or b.numel() == 0:
        return grad_a, grad_b
    sym = sym.detach().to(device=a.device, dtype=acc).contiguous()
    config = backward_config(positions, d, p, a.dtype)
    column_tiles = max(triton.cdiv(d, config["WIDTH_A"]) if need_a else 1,
                       triton.cdiv(p, config["WIDTH_B"]) if need_b else 1)
    grid = (num, triton.cdiv(positions, config["BLOCK_T"]), column_tiles)
    # An unneeded output still needs a valid pointer: pass sym (never written then).
    _ghost_backward_kernel[grid](
        a, b, sym, grad_a if need_a else sym, grad_b if need_b else sym, num, positions, d, p,
        *a.stride(), *b.stride(),
        DOT_DTYPE=_dot_dtype(a.dtype), ACC_DTYPE=_TORCH_TO_TRITON[acc], NEED_A=need_a, NEED_B=need_b, **config)
    return grad_a, grad_b
