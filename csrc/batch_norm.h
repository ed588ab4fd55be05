// BatchNorm's backward and its derivative with batch statistics (training
// behaviour) on the CPU, each two passes over a channel's elements (statistics,
// then outputs). PyTorch differentiates its BatchNorm backward with a composite
// of about thirty elementwise ops (batchnorm_double_backward): in NIO's exact
// mode on a BatchNorm ResNet-20 that composite was half of every iteration.
// The backward is slower than PyTorch's native_batch_norm_backward (0.9 against
// 0.53 ms at [64, 16, 32, 32]) but allocates nothing besides its outputs: with
// PyTorch's inside the chunk graphs NIO's exact mode peaked at 865-1000 MB
// instead of 695-710 MB (BatchNorm ResNet-20, D = 8, resident set), so the
// graph-building backward is this one and a first-order backward PyTorch's.
//
// x [N, C, *] (viewed as [N, C, HW]), mean / rstd [C] as returned by
// native_batch_norm in training, weight [C] or undefined (no affine), gy like x.
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace nio_fast {

// (grad_x, grad_weight [C], grad_bias [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight);

// The vector-Jacobian product of BatchNorm's backward (grad_x, grad_weight [C],
// grad_bias [C] as functions of grad_out, x and weight) with cotangents u (like x),
// p and q ([C], for the weight and bias gradients); any may be undefined (zero).
// Returns (d grad_out, d x, d weight [C]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q);

// The same VJP without grad_out: it is rebuilt per element from the backward's outputs
// (grad_x, grad_weight, grad_bias), so a graph that keeps those need not keep grad_out too.
// Needs a weight far from zero (or none): see grad_out_rebuildable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_from_grad_x(
    const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& u,
    const at::Tensor& p, const at::Tensor& q);

// Whether grad_out can be rebuilt from grad_x: weight undefined, or every |entry| at least the
// square root of its dtype's smallest normal number (a CPU read).
bool grad_out_rebuildable(const at::Tensor& weight);

}  // namespace nio_fast
