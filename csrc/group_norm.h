// GroupNorm's backward and double backward on the CPU, each two passes over a
// group's elements (statistics, then outputs) instead of the ~40 elementwise
// ops PyTorch's differentiable GroupNorm backward composes. Affine gradients
// are returned per sample ([N, C]): under vmap over chunks the chunks' own
// sums are a reshape and a sum of those (nio_fast/ops/group_norm.py).
//
// x [N, C, *] (viewed as [N, C, HW]), mean / rstd [N, G] as returned by
// native_group_norm, weight [C] or undefined (no affine), gy like x.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace nio_fast {

// (grad_x, grad_weight per sample [N, C], grad_bias per sample [N, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight, int64_t groups);

// The vector-Jacobian product of group_norm_backward with cotangents u (like x),
// p and q ([N, C], for the per-sample weight and bias gradients); any may be
// undefined (zero). Returns (d grad_out, d x, d weight per sample [N, C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, int64_t groups, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q);

}  // namespace nio_fast
