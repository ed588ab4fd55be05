// Per-tensor inner products s_p = <a[p], b[p]> (the scale optimizer's reduction).
#pragma once

#include <vector>

#include <ATen/ATen.h>

#include "dtype_code.h"

namespace nio_fast {

// a[p] and b[p] prepared for a linear walk in one common element order.
struct TensorPairs {
  int64_t num_tensors = 0;
  c10::Device device{c10::kCPU};
  std::vector<at::Tensor> a, b;
  std::vector<DtypeCode> a_dtype, b_dtype;
  std::vector<int64_t> numel;
  std::vector<const void*> a_data, b_data;
};

// Validates (equal lengths and shapes, floating dtypes, one device) and makes
// contiguous copies only where a[p], b[p] cannot be walked together.
TensorPairs prepare_tensor_pairs(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

// float64 [P] on the inputs' device.
at::Tensor tensor_dots(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b);

at::Tensor tensor_dots_cpu(const TensorPairs& pairs);

}  // namespace nio_fast
