// LayerNorm double backward, CPU (see layer_norm.h). One task per row of E
// elements; pass 1 sums over the row, pass 2 writes the outputs. It is
// GroupNorm's algebra (group_norm.cpp) with one group per row and a gamma per
// element: x_hat = (x - mean) r, a = gamma gy, P(z) = z - mean(z) - x_hat mean(x_hat z):
//   grad_x   = r P(a),  grad_weight = sum_rows gy x_hat,  grad_bias = sum_rows gy
//   VJP with (u, p, q):
//   d gy     = gamma r P(u) + p x_hat + q
//   d weight = sum_rows r P(u) gy
//   d x      = r P(w) - t r^2 x_hat,  w = -r (u mean(a x_hat) + a mean(u x_hat)) + p gy,
//              t = mean(u P(a))
#include "layer_norm.h"

#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "norm_args.h"

namespace nio_fast {
namespace {

using norm_args::contiguous_or_undefined;
using norm_args::data_or_null;

struct RowShape {
  int64_t rows, e;
};

RowShape check_inputs(const char* fn, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                      const at::Tensor& rstd, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 2, fn, ": x must be [R, E], got ", x.sizes());
  norm_args::check_float_cpu(fn, x);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), fn, ": grad_out has shape ", grad_out.sizes(), ", x ",
                    x.sizes());
  const int64_t rows = x.size(0), e = x.size(1);
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->numel() == rows, fn, ": mean and rstd must have R = ", rows, " elements, got ",
                      t->numel());
  }
  norm_args::check_dtype_of_x(fn, x, {&grad_out, &mean, &rstd});
  norm_args::check_holds(fn, "weight", "E", e, x, {&weight});
  return {rows, e};
}


// Per-thread [E] partial sums of the weight gradient, added in thread order at the end.
class RowSums {
 public:
  explicit RowSums(int64_t e) : e_(e), threads_(at::get_num_threads()), sums_(static_cast<size_t>(threads_ * e), 0.0) {}
  double* of_this_thread() { return sums_.data() + at::get_thread_num() * e_; }
  template <typename T>
  void write(T* out) const {
    for (int64_t k = 0; k < e_; ++k) {
      double total = 0;
      for (int64_t thread = 0; thread < threads_; ++thread) total += sums_[thread * e_ + k];
      out[k] = static_cast<T>(total);
    }
  }

 private:
  int64_t e_, threads_;
  std::vector<double> sums_;
};

// kAll: gamma, u, p and q are all given (NIO's case): the per-element loops then test no pointer,
// which lets them vectorise.
template <typename T, bool kAll>
void double_backward_rows(const RowShape& s, const T* gy, const T* x, const T* mean, const T* rstd,
                          const T* gamma, const T* u, const T* p, const T* q, T* d_gy, T* d_x, T* d_w) {
  const int64_t e = s.e;
  const double m = static_cast<double>(e);
  RowSums sums(e);
  at::parallel_for(0, s.rows, 1, [&](int64_t begin, int64_t end) {
    double* sum_d_w = sums.of_this_thread();
    // d_w is summed over rows in T for blocks of kBlockRows (a vectorised loop), then in double.
    constexpr int64_t kBlockRows = 32;
    std::vector<T> block_d_w(e, T(0));
    for (int64_t row = begin; row < end; ++row) {
      const T* g = gy + row * e;
      const T* xr = x + row * e;
      const T* ur = u ? u + row * e : nullptr;
      const T mu = mean[row];
      const double r = rstd[row];
      const T rt = static_cast<T>(r);
      // Pass 1: a = gamma gy, z = p gy (the p part of w), all against x_hat.
      T s_a = 0, s_a_xhat = 0, s_u = 0, s_u_xhat = 0, s_u_a = 0, s_z = 0, s_z_xhat = 0;
#pragma omp simd reduction(+ : s_a, s_a_xhat, s_u, s_u_xhat, s_u_a, s_z, s_z_xhat)
      for (int64_t k = 0; k < e; ++k) {
        const T xhat = (xr[k] - mu) * rt;
        const T a = (kAll || gamma) ? gamma[k] * g[k] : g[k], z = (kAll || p) ? p[k] * g[k] : T(0);
        const T uk = (kAll || ur) ? ur[k] : T(0);
        s_a += a;
        s_a_xhat += a * xhat;
        s_u += uk;
        s_u_xhat += uk * xhat;
        s_u_a += uk * a;
        s_z += z;
        s_z_xhat += z * xhat;
      }
      const double mean_a = s_a / m, mean_a_xhat = s_a_xhat / m, mean_u = s_u / m, mean_u_xhat = s_u_xhat / m,
                   mean_u_a = s_u_a / m;
      const double t = mean_u_a - mean_u * mean_a - mean_u_xhat * mean_a_xhat;
      const double mean_w = -r * (mean_u * mean_a_xhat + mean_a * mean_u_xhat) + s_z / m;
      const double mean_w_xhat = -2.0 * r * mean_u_xhat * mean_a_xhat + s_z_xhat / m;
      const T mu_u = static_cast<T>(mean_u), mu_ux = static_cast<T>(mean_u_xhat);
      const T w_u = static_cast<T>(-r * mean_a_xhat), w_a = static_cast<T>(-r * mean_u_xhat);
      const T w_const = static_cast<T>(-mean_w), w_xhat = static_cast<T>(-mean_w_xhat - t * r);
      T* block = block_d_w.data();
#pragma omp simd
      for (int64_t k = 0; k < e; ++k) {
        const T xhat = (xr[k] - mu) * rt, gk = (kAll || gamma) ? gamma[k] : T(1);
        const T uk = (kAll || ur) ? ur[k] : T(0), pk = (kAll || p) ? p[k] : T(0), qk = (kAll || q) ? q[k] : T(0);
        const T projected_u = uk - mu_u - xhat * mu_ux;  // P(u)
        d_gy[row * e + k] = gk * rt * projected_u + pk * xhat + qk;
        d_x[row * e + k] = rt * (w_u * uk + (w_a * gk + pk) * g[k] + w_const + w_xhat * xhat);
        block[k] += rt * projected_u * g[k];
      }
      if ((row - begin + 1) % kBlockRows == 0 || row + 1 == end) {
        for (int64_t k = 0; k < e; ++k) {
          sum_d_w[k] += block[k];
          block[k] = T(0);
        }
      }
    }
  });
  sums.write(d_w);
}

template <typename T>
void double_backward_kernel(const RowShape& s, const T* gy, const T* x, const T* mean, const T* rstd,
                            const T* gamma, const T* u, const T* p, const T* q, T* d_gy, T* d_x, T* d_w) {
  if (gamma && u && p && q) {
    double_backward_rows<T, true>(s, gy, x, mean, rstd, gamma, u, p, q, d_gy, d_x, d_w);
  } else {
    double_backward_rows<T, false>(s, gy, x, mean, rstd, gamma, u, p, q, d_gy, d_x, d_w);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q) {
  const char* fn = "layer_norm_double_backward";
  const RowShape s = check_inputs(fn, grad_out, x, mean, rstd, weight);
  norm_args::check_like_x(fn, u, x);
  norm_args::check_holds(fn, "p and q", "E", s.e, x, {&p, &q});
  const at::Tensor gy = grad_out.contiguous(), xc = x.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor gamma = contiguous_or_undefined(weight), uc = contiguous_or_undefined(u),
                   pc = contiguous_or_undefined(p), qc = contiguous_or_undefined(q);
  at::Tensor d_gy = at::empty_like(xc), d_x = at::empty_like(xc), d_w = at::empty({s.e}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "layer_norm_double_backward", [&] {
    double_backward_kernel<scalar_t>(s, gy.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                                     r.data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma),
                                     data_or_null<scalar_t>(uc), data_or_null<scalar_t>(pc),
                                     data_or_null<scalar_t>(qc), d_gy.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
                                     d_w.data_ptr<scalar_t>());
  });
  return {d_gy, d_x, d_w};
}

}  // namespace nio_fast
