// Torch-facing CUDA implementations (gram_cuda_binding.cpp,
// chunk_reduce_cuda_binding.cpp), compiled only when the extension is built
// with CUDA (NIO_FAST_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>

#include "gradient_list.h"
#include "tensor_dots.h"

namespace nio_fast {

at::Tensor gram_forward_cuda(const WalkableGradients& grads);
GradientList gram_backward_cuda(const WalkableGradients& grads, const GradientList& original, const at::Tensor& S);
at::Tensor tensor_dots_cuda(const TensorPairs& pairs);

// Chunk row sums (chunk_reduce_cuda_binding.cpp). The caller checks shapes, dtypes (float32 /
// float64) and devices and passes contiguous tensors; the rows' contents are not checked here.
at::Tensor chunk_row_sums_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                               const at::Tensor& weights);

}  // namespace nio_fast
