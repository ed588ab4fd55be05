// Argument checks and pointer helpers shared by the normalisation kernels
// (group_norm.cpp, batch_norm.cpp, layer_norm.cpp): float32/float64 CPU tensors,
// optional tensors passed as undefined ones.
#pragma once

#include <initializer_list>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace nio_fast {
namespace norm_args {

inline at::Tensor contiguous_or_undefined(const at::Tensor& t) { return t.defined() ? t.contiguous() : t; }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline void check_float_cpu(const char* fn, const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, fn,
                   ": expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), fn, ": CPU tensors only, got ", x.device());
}

inline void check_dtype_of_x(const char* fn, const at::Tensor& x, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), fn, ": every input must have x's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
  }
}

// "NAMES must hold WHAT = count values of x's dtype", for each of tensors that is defined.
inline void check_holds(const char* fn, const char* names, const char* what, int64_t count, const at::Tensor& x,
                        std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined()) {
      TORCH_CHECK_VALUE(t->numel() == count && t->scalar_type() == x.scalar_type(), fn, ": ", names,
                        " must hold ", what, " = ", count, " values of x's dtype, got ", t->sizes(), " ",
                        t->scalar_type());
    }
  }
}

inline void check_like_x(const char* fn, const at::Tensor& u, const at::Tensor& x) {
  if (u.defined()) {
    TORCH_CHECK_VALUE(u.sizes() == x.sizes() && u.scalar_type() == x.scalar_type(), fn, ": u must match x (",
                      x.sizes(), " ", x.scalar_type(), "), got ", u.sizes(), " ", u.scalar_type());
  }
}

}  // namespace norm_args
}  // namespace nio_fast
