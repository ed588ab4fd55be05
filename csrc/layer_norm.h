// The derivative of LayerNorm's backward on the CPU: two passes over a row
// (statistics, then outputs) instead of the composite of elementwise ops PyTorch
// differentiates its LayerNorm backward with (layer_norm_double_backward). The
// backward itself is PyTorch's fused native_layer_norm_backward. The weight
// gradient is a sum over rows: each thread keeps its own partial sums (double)
// and they are added at the end, in a fixed order.
//
// x [R, E] (the rows of any [..., *normalized_shape] input), mean / rstd [R] as
// returned by native_layer_norm, weight [E] or undefined (no affine), gy like x.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace nio_fast {

// The vector-Jacobian product of LayerNorm's backward (grad_x, grad_weight,
// grad_bias as functions of grad_out, x and weight) with cotangents u (like x),
// p and q ([E], for the weight and bias gradients); any may be undefined (zero).
// Returns (d grad_out, d x, d weight [E]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q);

}  // namespace nio_fast
