// Softmax double backward of attention, CPU (see attention.h).
#include "attention.h"

#include <initializer_list>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "norm_args.h"

namespace nio_fast {
namespace {

// Rows per parallel task: 64-key rows are 256 B per tensor in float32, so a grain of 64 rows
// keeps the per-task overhead small against four 16 KB streams.
constexpr int64_t kGrainRows = 64;

template <typename T>
void double_backward_rows(int64_t rows, int64_t keys, const T* probabilities, T* grad_p, T* cot_grad_scores,
                          T* cot_p, T scale) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* p = probabilities + row * keys;
      T* dp = grad_p + row * keys;
      T* h = cot_grad_scores + row * keys;
      T* c = cot_p + row * keys;
      // Sums in double: long rows (thousands of keys) keep float32's 1e-5 against the twin.
      double p_dp = 0, p_h = 0;
#pragma omp simd reduction(+ : p_dp, p_h)
      for (int64_t k = 0; k < keys; ++k) {
        p_dp += static_cast<double>(p[k]) * dp[k];
        p_h += static_cast<double>(p[k]) * h[k];
      }
      const T mean_dp = static_cast<T>(p_dp), weighted = static_cast<T>(p_h) * scale;
      double p_gp = 0;
#pragma omp simd reduction(+ : p_gp)
      for (int64_t k = 0; k < keys; ++k) {
        const T pk = p[k], dpk = dp[k], hk = h[k] * scale, centred = dpk - mean_dp;
        const T gp = hk * centred - weighted * dpk + c[k];
        dp[k] = pk * centred;
        h[k] = pk * (hk - weighted);
        c[k] = gp;
        p_gp += static_cast<double>(gp) * pk;
      }
      const T mean_gp = static_cast<T>(p_gp);
#pragma omp simd
      for (int64_t k = 0; k < keys; ++k) c[k] = p[k] * (c[k] - mean_gp);
    }
  });
}

}  // namespace

void attention_softmax_double_backward_(const at::Tensor& probabilities, at::Tensor& grad_p,
                                        at::Tensor& cot_grad_scores, at::Tensor& cot_p, double scale) {
  const char* fn = "attention_softmax_double_backward_";
  norm_args::check_float_cpu(fn, probabilities);
  norm_args::check_dtype_of_x(fn, probabilities, {&grad_p, &cot_grad_scores, &cot_p});
  TORCH_CHECK_VALUE(probabilities.dim() >= 1, fn, ": probabilities must have a key axis");
  const std::initializer_list<const at::Tensor*> tensors{&probabilities, &grad_p, &cot_grad_scores, &cot_p};
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK_VALUE(t->sizes() == probabilities.sizes(), fn, ": every tensor must have the probabilities' shape ",
                      probabilities.sizes(), ", got ", t->sizes());
    TORCH_CHECK_VALUE(t->is_contiguous(), fn, ": every tensor must be contiguous");
    TORCH_CHECK_VALUE(t->device().is_cpu(), fn, ": CPU tensors only, got ", t->device());
  }
  const void* data[] = {probabilities.data_ptr(), grad_p.data_ptr(), cot_grad_scores.data_ptr(), cot_p.data_ptr()};
  for (int i = 0; i < 4; ++i) {
    for (int j = i + 1; j < 4; ++j) {
      TORCH_CHECK_VALUE(probabilities.numel() == 0 || data[i] != data[j], fn,
                        ": the four tensors must not share memory (three are written in place)");
    }
  }
  const int64_t keys = probabilities.size(-1), rows = keys == 0 ? 0 : probabilities.numel() / keys;
  AT_DISPATCH_FLOATING_TYPES(probabilities.scalar_type(), "attention_softmax_double_backward_", [&] {
    double_backward_rows<scalar_t>(rows, keys, probabilities.data_ptr<scalar_t>(), grad_p.data_ptr<scalar_t>(),
                                   cot_grad_scores.data_ptr<scalar_t>(), cot_p.data_ptr<scalar_t>(),
                                   static_cast<scalar_t>(scale));
  });
}

}  // namespace nio_fast
