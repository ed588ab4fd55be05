"""Triton kernels of GroupNorm's backward and double backward (the GPU twins of
``csrc/group_norm.cpp``; the math is in that file's header and in ``nio_fast/ops/group_norm.py``).

One program per (sample, group); each walks the group's channels and, per channel, its spatial
axis in blocks of BLOCK: a statistics pass, then an output pass (the group's elements are read
twice, written once). x, grad_out and u are [N, C, HW] contiguous; mean and rstd [N, G];
per-sample affine tensors [N, C]. Sums run in the data's dtype (float32 or float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["SUPPORTED_DTYPES", "group_norm_backward", "group_norm_double_backward"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# Not timed on a GPU yet (none was available when written): a 1024-wide block covers a 32x32
# feature map per step; smaller maps shrink it.
_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _backward_kernel(gy_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, gx_ptr, gw_ptr, gb_ptr,
                     C, HW, G, CG, HAS_GAMMA: tl.constexpr, BLOCK: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    n = task // G
    g = task % G
    mu = tl.load(mean_ptr + task)
    r = tl.load(rstd_ptr + task)
    zero = mu * 0
    sum_a = zero
    sum_a_xhat = zero
    offsets = tl.arange(0, BLOCK)
    for k in range(0, CG):
        c = g * CG + k
        row = (n * C + c) * HW
        s_gy = zero
        s_gy_d = zero
        for start in range(0, HW, BLOCK):
            idx = start + offsets
            ok = idx < HW
            gy = tl.load(gy_ptr + row + idx, mask=ok, other=0.0)
            x = tl.load(x_ptr + row + idx, mask=ok, other=0.0)
            s_gy += tl.sum(gy, axis=0)
            s_gy_d += tl.sum(tl.where(ok, gy * (x - mu), 0.0), axis=0)
        gamma = tl.load(gamma_ptr + c) if HAS_GAMMA else zero + 1
        tl.store(gb_ptr + n * C + c, s_gy)
        tl.store(gw_ptr + n * C + c, r * s_gy_d)
        sum_a += gamma * s_gy
        sum_a_xhat += gamma * r * s_gy_d
    count = (CG * HW).to(mu.dtype)
    mean_a = sum_a / count
    mean_a_xhat = sum_a_xhat / count
    for k in range(0, CG):
        c = g * CG + k
        row = (n * C + c) * HW
        gamma = tl.load(gamma_ptr + c) if HAS_GAMMA else zero + 1
        for start in range(0, HW, BLOCK):
            idx = start + offsets
            ok = idx < HW
            gy = tl.load(gy_ptr + row + idx, mask=ok, other=0.0)
            xhat = (tl.load(x_ptr + row + idx, mask=ok, other=0.0) - mu) * r
            tl.store(gx_ptr + row + idx, r * (gamma * gy - mean_a - xhat * mean_a_xhat), mask=ok)


@triton.jit
def _double_backward_kernel(gy_ptr, x_ptr, mean_ptr, rstd_ptr, gamma_ptr, u_ptr, p_ptr, q_ptr,
                            d_gy_ptr, d_x_ptr, d_w_ptr, sums_ptr,
                            C, HW, G, CG, HAS_GAMMA: tl.constexpr, HAS_U: tl.constexpr, HAS_P: tl.constexpr,
                            HAS_Q: tl.constexpr, BLOCK: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    n = task // G
    g = task % G
    mu = tl.load(mean_ptr + task)
    r = tl.load(rstd_ptr + task)
    zero = mu * 0
    sum_a = zero
    sum_a_xhat = zero
    sum_u = zero
    sum_u_xhat = zero
    sum_u_a = zero
    sum_z = zero
    sum_z_xhat = zero
    offsets = tl.arange(0, BLOCK)
    for k in range(0, CG):
        c = g * CG + k
        row = (n * C + c) * HW
        s_gy = zero
        s_gy_d = zero
        s_u = zero
        s_u_d = zero
        s_u_gy = zero
        for start in range(0, HW, BLOCK):
            idx = start + offsets
            ok = idx < HW
            gy = tl.load(gy_ptr + row + idx, mask=ok, other=0.0)
            d = tl.where(ok, tl.load(x_ptr + row + idx, mask=ok, other=0.0) - mu, 0.0)
            s_gy += tl.sum(gy, axis=0)
            s_gy_d += tl.sum(gy * d, axis=0)
            if HAS_U:
                u = tl.load(u_ptr + row + idx, mask=ok, other=0.0)
                s_u += tl.sum(u, axis=0)
                s_u_d += tl.sum(u * d, axis=0)
                s_u_gy += tl.sum(u * gy, axis=0)
        gamma = tl.load(gamma_ptr + c) if HAS_GAMMA else zero + 1
        pc = tl.load(p_ptr + n * C + c) if HAS_P else zero
        # channel sums kept for d_weight, which needs the group's means first
        tl.store(sums_ptr + (n * C + c) * 3, s_gy)
        tl.store(sums_ptr + (n * C + c) * 3 + 1, s_gy_d)
        tl.store(sums_ptr + (n * C + c) * 3 + 2, s_u_gy)
        sum_a += gamma * s_gy
        sum_a_xhat += gamma * r * s_gy_d
        sum_u += s_u
        sum_u_xhat += r * s_u_d
        sum_u_a += gamma * s_u_gy
        sum_z += pc * s_gy
        sum_z_xhat += pc * r * s_gy_d
    count = (CG * HW).to(mu.dtype)
    mean_a = sum_a / count
    mean_a_xhat = sum_a_xhat / count
    mean_u = sum_u / count
    mean_u_xhat = sum_u_xhat / count
    t = sum_u_a / count - mean_u * mean_a - mean_u_xhat * mean_a_xhat
    mean_w = -r * (mean_u * mean_a_xhat + mean_a * mean_u_xhat) + sum_z / count
    mean_w_xhat = -2.0 * r * mean_u_xhat * mean_a_xhat + sum_z_xhat / count
    for k in range(0, CG):
        c = g * CG + k
        row = (n * C + c) * HW
        gamma = tl.load(gamma_ptr + c) if HAS_GAMMA else zero + 1
        pc = tl.load(p_ptr + n * C + c) if HAS_P else zero
        qc = tl.load(q_ptr + n * C + c) if HAS_Q else zero
        s_gy = tl.load(sums_ptr + (n * C + c) * 3)
        s_gy_d = tl.load(sums_ptr + (n * C + c) * 3 + 1)
        s_u_gy = tl.load(sums_ptr + (n * C + c) * 3 + 2)
        tl.store(d_w_ptr + n * C + c, r * (s_u_gy - mean_u * s_gy - mean_u_xhat * r * s_gy_d))
        w_u = -r * mean_a_xhat
        w_gy = -r * gamma * mean_u_xhat + pc
        w_xhat = -mean_w_xhat - t * r
        for start in range(0, HW, BLOCK):
            idx = start + offsets
            ok = idx < HW
            gy = tl.load(gy_ptr + row + idx, mask=ok, other=0.0)
            xhat = (tl.load(x_ptr + row + idx, mask=ok, other=0.0) - mu) * r
            u = tl.load(u_ptr + row + idx, mask=ok, other=0.0) if HAS_U else zero
            d_gy = gamma * r * (u - mean_u - xhat * mean_u_xhat) + pc * xhat + qc
            d_x = r * (w_u * u + w_gy * gy - mean_w + w_xhat * xhat)
            tl.store(d_gy_ptr + row + idx, d_gy, mask=ok)
            tl.store(d_x_ptr + row + idx, d_x, mask=ok)


def _prepare(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, groups: int):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: the Triton GroupNorm kernels take float32 or float64, got {x.dtype}")
    n, c = x.shape[:2]
    hw = x.numel() // max(n * c, 1)
    return (grad_out.contiguous(), x.contiguous(), mean.contiguous(), rstd.contiguous(), n, c, hw,
            triton.next_power_of_2(max(min(hw, _BLOCK), 16)))


def group_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: Optional[torch.Tensor], groups: int):
    """(grad_x, grad_weight [N, C], grad_bias [N, C]) per sample; see ``csrc/group_norm.h``."""
    grad_out, x, mean, rstd, n, c, hw, block = _prepare(grad_out, x, mean, rstd, groups)
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = (x.new_empty(n, c) for _ in range(2))
    gamma = weight.contiguous() if weight is not None else x
    _backward_kernel[(n * groups,)](grad_out, x, mean, rstd, gamma, grad_x, grad_weight, grad_bias, c, hw, groups,
                                    c // groups, HAS_GAMMA=weight is not None, BLOCK=block, num_warps=_NUM_WARPS)
    return grad_x, grad_weight, grad_bias


def group_norm_double_backward(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                               weight: Optional[torch.Tensor], groups: int, u: Optional[torch.Tensor],
                               p: Optional[torch.Tensor], q: Optional[torch.Tensor]):
    """(d grad_out, d x, d weight per sample [N, C]): the VJP of :func:`group_norm_backward`."""
    grad_out, x, mean, rstd, n, c, hw, block = _prepare(grad_out, x, mean, rstd, groups)
    d_grad_out, d_x = torch.empty_like(x), torch.empty_like(x)
    d_weight, sums = x.new_empty(n, c), x.new_empty(n, c, 3)
    present = lambda t: t.contiguous() if t is not None else x  # noqa: E731  (a dummy pointer when absent)
    _double_backward_kernel[(n * groups,)](
        grad_out, x, mean, rstd, present(weight), present(u), present(p), present(q), d_grad_out, d_x, d_weight,
        sums, c, hw, groups, c // groups, HAS_GAMMA=weight is not None, HAS_U=u is not None, HAS_P=p is not None,
        HAS_Q=q is not None, BLOCK=block, num_warps=_NUM_WARPS)
    return d_grad_out, d_x, d_weight
