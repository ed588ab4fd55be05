// Validation of the grads[d][p] argument shared by every entry point, and the
// "walkable" form the kernels consume: each tensor is read linearly from its
// first element in storage order, the same order for all d of one p.
#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "dtype_code.h"

namespace nio_fast {

using GradientList = std::vector<std::vector<at::Tensor>>;

// What to do with a parameter p whose tensors cannot be walked in place
// (gaps, expanded dimensions, strides that differ across d).
enum class NonWalkable { kCopy, kReject };

struct WalkableGradients {
  int64_t num_grads = 0;    // D
  int64_t num_tensors = 0;  // P
  c10::Device device{c10::kCPU};
  bool any_float64 = false;
  std::vector<at::Tensor> tensors;  // [d * P + p]: same values as grads[d][p], walkable
  std::vector<int64_t> numel;       // [p]
  std::vector<DtypeCode> dtype;     // [p]
  std::vector<const void*> first_element;  // [d * P + p]: address of the first element in storage order

  const at::Tensor& tensor(int64_t d, int64_t p) const { return tensors[d * num_tensors + p]; }
  const void* data(int64_t d, int64_t p) const { return first_element[d * num_tensors + p]; }
  int64_t total_numel() const;
};

// Checks grads (D >= 1 lists of P tensors; per p equal shapes and dtypes;
// float16/bfloat16/float32/float64; strided; one device) and returns the
// walkable form. `fn` prefixes error messages.
WalkableGradients prepare_gradients(const GradientList& grads, const char* fn, NonWalkable policy);

// Dense, non-overlapping: the elements fill [data_ptr, data_ptr + numel).
bool is_walkable(const at::Tensor& t);
// Same logical-to-storage mapping (strides of size-1 dimensions do not matter).
bool same_storage_order(const at::Tensor& a, const at::Tensor& b);

// "torch.float32" etc., as users write them.
std::string dtype_name(at::ScalarType type);
// Throws TypeError naming `what` for dtypes the kernels do not handle.
DtypeCode dtype_code_of(at::ScalarType type, const char* fn, const std::string& what);

}  // namespace nio_fast
