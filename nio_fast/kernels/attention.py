"""Triton kernel of attention's softmax double backward (the GPU twin of ``csrc/attention.cpp``;
the algebra is in that file's header and in ``nio_fast/ops/attention.py``).

Per row of S keys, with P the probabilities, dP their gradient, H the cotangent of the scores'
gradient (before ``scale``) and C the value-side part of P's cotangent, it overwrites dP with
dS = P (dP - <P, dP>), H with GdP = P (scale H - w) and C with GS = P (GP - <GP, P>), where
w = scale <H, P> and GP = scale H (dP - <P, dP>) - w dP + C. PyTorch's composition of the same
formulas is about a dozen elementwise kernels, each a pass over the [*, L, S] tensors; here
every row is three passes (sums, outputs, the last softmax backward).

One program takes BLOCK_ROWS rows as a [BLOCK_ROWS, BLOCK_KEYS] tile, looping over the keys
where a row is longer than BLOCK_KEYS. Sums run in the data's dtype (float32 or float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["SUPPORTED_DTYPES", "attention_softmax_double_backward_"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# Not timed on a GPU yet (none was available when written). Compiled for sm_90 with 4 warps
# (tests/test_triton_attention.py), 4096-value tiles spilled (fp32 64-key rows: 255 registers and
# 1.4 KB of stack; fp64: 3 KB) and 2048 still did; 1024 spills none (fp32 166, fp64 247 registers).
_TILE_VALUES = 1024
_MAX_BLOCK_KEYS = 1024
_NUM_WARPS = 4


@triton.jit
def _softmax_double_backward_kernel(p_ptr, dp_ptr, h_ptr, c_ptr, scale_ptr, rows, keys,
                                    BLOCK_ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    row_ok = row < rows
    cols = tl.arange(0, BLOCK_KEYS)[None, :]
    base = row * keys
    scale = tl.load(scale_ptr)
    sum_p_dp = tl.zeros([BLOCK_ROWS], dtype=p_ptr.dtype.element_ty)
    sum_p_h = tl.zeros([BLOCK_ROWS], dtype=p_ptr.dtype.element_ty)
    for start in range(0, keys, BLOCK_KEYS):
        ok = row_ok & (start + cols < keys)
        offsets = base + start + cols
        p = tl.load(p_ptr + offsets, mask=ok, other=0.0)
        sum_p_dp += tl.sum(p * tl.load(dp_ptr + offsets, mask=ok, other=0.0), axis=1)
        sum_p_h += tl.sum(p * tl.load(h_ptr + offsets, mask=ok, other=0.0), axis=1)
    mean_dp = sum_p_dp[:, None]
    weighted = (sum_p_h * scale)[:, None]
    sum_p_gp = tl.zeros([BLOCK_ROWS], dtype=p_ptr.dtype.element_ty)
    for start in range(0, keys, BLOCK_KEYS):
        ok = row_ok & (start + cols < keys)
        offsets = base + start + cols
        p = tl.load(p_ptr + offsets, mask=ok, other=0.0)
        dp = tl.load(dp_ptr + offsets, mask=ok, other=0.0)
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0) * scale
        centred = dp - mean_dp
        gp = h * centred - weighted * dp + tl.load(c_ptr + offsets, mask=ok, other=0.0)
        tl.store(dp_ptr + offsets, p * centred, mask=ok)
        tl.store(h_ptr + offsets, p * (h - weighted), mask=ok)
        tl.store(c_ptr + offsets, gp, mask=ok)
        sum_p_gp += tl.sum(gp * p, axis=1)
    mean_gp = sum_p_gp[:, None]
    for start in range(0, keys, BLOCK_KEYS):
        ok = row_ok & (start + cols < keys)
        offsets = base + start + cols
        p = tl.load(p_ptr + offsets, mask=ok, other=0.0)
        tl.store(c_ptr + offsets, p * (tl.load(c_ptr + offsets, mask=ok, other=0.0) - mean_gp), mask=ok)


def attention_softmax_double_backward_(probabilities: torch.Tensor, grad_p: torch.Tensor,
                                       cot_grad_scores: torch.Tensor, cot_p: torch.Tensor, scale: float) -> None:
    """In place: grad_p <- dS, cot_grad_scores (H before ``scale``) <- GdP, cot_p <- GS; the
    contract of the extension's function of this name (contiguous tensors of one shape, dtype and
    device, none sharing memory), on CUDA tensors (CPU ones under TRITON_INTERPRET=1)."""
    tensors = (probabilities, grad_p, cot_grad_scores, cot_p)
    for t in tensors:
        if t.shape != probabilities.shape or t.dtype != probabilities.dtype or t.device != probabilities.device:
            raise ValueError(f"attention_softmax_double_backward_: every tensor must have the probabilities' "
                             f"shape, dtype and device ({tuple(probabilities.shape)}, {probabilities.dtype}, "
                             f"{probabilities.device}), got {tuple(t.shape)}, {t.dtype}, {t.device}")
        if not t.is_contiguous():
            raise ValueError("attention_softmax_double_backward_: every tensor must be contiguous")
    if probabilities.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attention_softmax_double_backward_: expected float32 or float64, got {probabilities.dtype}")
    if probabilities.dim() == 0:
        raise ValueError("attention_softmax_double_backward_: probabilities must have a key axis")
    if probabilities.numel() == 0:
        return
    if len({t.data_ptr() for t in tensors}) != len(tensors):
        raise ValueError("attention_softmax_double_backward_: the four tensors must not share memory "
                         "(three are written in place)")
    keys = probabilities.shape[-1]
    rows = probabilities.numel() // keys
    block_keys = min(triton.next_power_of_2(keys), _MAX_BLOCK_KEYS)
    block_rows = min(max(1, _TILE_VALUES // block_keys), triton.next_power_of_2(rows))
    scale_tensor = torch.full((1,), scale, dtype=probabilities.dtype, device=probabilities.device)
    _softmax_double_backward_kernel[(triton.cdiv(rows, block_rows),)](
        probabilities, grad_p, cot_grad_scores, cot_p, scale_tensor, rows, keys,
        BLOCK_ROWS=block_rows, BLOCK_KEYS=block_keys, num_warps=_NUM_WARPS)
