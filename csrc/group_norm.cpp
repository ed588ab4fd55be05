// GroupNorm backward and double backward, CPU (see group_norm.h). One task per
// (sample, group); within it, pass 1 sums per channel over the spatial axis
// (vectorised, accumulated in double across channels), pass 2 writes the
// outputs. Derivation (per group of M elements, x_hat = (x - mean) r, a = gamma gy,
// P(z) = z - mean(z) - x_hat mean(x_hat z)):
//   grad_x   = r P(a)
//   VJP with (u, p, q):
//   d gy     = gamma r P(u) + p x_hat + q
//   d weight = sum_hw r P(u) gy                     (per sample, per channel)
//   d x      = r P(w) - t r^2 x_hat,  w = -r (u mean(a x_hat) + a mean(u x_hat)) + p gy,
//              t = mean(u P(a))
// (the VJP of x_hat w.r.t. x is r P(.), and P is self-adjoint).
#include "group_norm.h"

#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "norm_args.h"

namespace nio_fast {
namespace {

using norm_args::contiguous_or_undefined;
using norm_args::data_or_null;

struct GroupShape {
  int64_t n, c, hw, groups, per_group;  // per_group: channels per group
};

GroupShape check_inputs(const char* fn, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& rstd, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() >= 2, fn, ": x must be [N, C, *], got ", x.sizes());
  norm_args::check_float_cpu(fn, x);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK_VALUE(groups > 0 && c % groups == 0, fn, ": groups = ", groups, " does not divide C = ", c);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), fn, ": grad_out has shape ", grad_out.sizes(), ", x ",
                    x.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->numel() == n * groups, fn, ": mean and rstd must have N * groups = ", n * groups,
                      " elements, got ", t->numel());
  }
  norm_args::check_dtype_of_x(fn, x, {&grad_out, &mean, &rstd});
  norm_args::check_holds(fn, "weight", "C", c, x, {&weight});
  const int64_t hw = n * c == 0 ? 0 : x.numel() / (n * c);
  return {n, c, hw, groups, c / groups};
}

template <typename T>
void backward_kernel(const GroupShape& s, const T* gy, const T* x, const T* mean, const T* rstd, const T* gamma,
                     T* gx, T* gw, T* gb) {
  const int64_t hw = s.hw;
  const double m = static_cast<double>(s.per_group * hw);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / s.groups, group = task % s.groups;
      const T mu = mean[task], r = rstd[task];
      double sum_a = 0, sum_a_xhat = 0;
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t channel = group * s.per_group + k, row = (sample * s.c + channel) * hw;
        T s_gy = 0, s_gy_d = 0;
#pragma omp simd reduction(+ : s_gy, s_gy_d)
        for (int64_t i = 0; i < hw; ++i) {
          s_gy += gy[row + i];
          s_gy_d += gy[row + i] * (x[row + i] - mu);
        }
        const double g = gamma ? gamma[channel] : 1.0;
        gb[sample * s.c + channel] = s_gy;
        gw[sample * s.c + channel] = r * s_gy_d;
        sum_a += g * s_gy;
        sum_a_xhat += g * r * s_gy_d;
      }
      const T mean_a = static_cast<T>(sum_a / m), mean_a_xhat = static_cast<T>(sum_a_xhat / m);
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t channel = group * s.per_group + k, row = (sample * s.c + channel) * hw;
        const T g = gamma ? gamma[channel] : T(1);
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) {
          const T xhat = (x[row + i] - mu) * r;
          gx[row + i] = r * (g * gy[row + i] - mean_a - xhat * mean_a_xhat);
        }
      }
    }
  });
}

template <typename T>
void double_backward_kernel(const GroupShape& s, const T* gy, const T* x, const T* mean, const T* rstd,
                            const T* gamma, const T* u, const T* p, const T* q, T* d_gy, T* d_x, T* d_w) {
  const int64_t hw = s.hw;
  const double m = static_cast<double>(s.per_group * hw);
  at::parallel_for(0, s.n * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> channel_gy(s.per_group), channel_gy_d(s.per_group), channel_u_gy(s.per_group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample = task / s.groups, group = task % s.groups;
      const T mu = mean[task];
      const double r = rstd[task];
      double sum_a = 0, sum_a_xhat = 0, sum_u = 0, sum_u_xhat = 0, sum_u_a = 0, sum_z = 0, sum_z_xhat = 0;
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t channel = group * s.per_group + k, row = (sample * s.c + channel) * hw;
        T s_gy = 0, s_gy_d = 0, s_u = 0, s_u_d = 0, s_u_gy = 0;
        if (u) {
#pragma omp simd reduction(+ : s_gy, s_gy_d, s_u, s_u_d, s_u_gy)
          for (int64_t i = 0; i < hw; ++i) {
            const T d = x[row + i] - mu;
            s_gy += gy[row + i];
            s_gy_d += gy[row + i] * d;
            s_u += u[row + i];
            s_u_d += u[row + i] * d;
            s_u_gy += u[row + i] * gy[row + i];
          }
        } else {
#pragma omp simd reduction(+ : s_gy, s_gy_d)
          for (int64_t i = 0; i < hw; ++i) {
            s_gy += gy[row + i];
            s_gy_d += gy[row + i] * (x[row + i] - mu);
          }
        }
        const double g = gamma ? gamma[channel] : 1.0, pc = p ? p[sample * s.c + channel] : 0.0;
        channel_gy[k] = s_gy;
        channel_gy_d[k] = s_gy_d;
        channel_u_gy[k] = s_u_gy;
        sum_a += g * s_gy;
        sum_a_xhat += g * r * s_gy_d;
        sum_u += s_u;
        sum_u_xhat += r * s_u_d;
        sum_u_a += g * s_u_gy;
        sum_z += pc * s_gy;
        sum_z_xhat += pc * r * s_gy_d;
      }
      const double mean_a = sum_a / m, mean_a_xhat = sum_a_xhat / m, mean_u = sum_u / m,
                   mean_u_xhat = sum_u_xhat / m, mean_u_a = sum_u_a / m;
      const double t = mean_u_a - mean_u * mean_a - mean_u_xhat * mean_a_xhat;
      const double mean_w = -r * (mean_u * mean_a_xhat + mean_a * mean_u_xhat) + sum_z / m;
      const double mean_w_xhat = -2.0 * r * mean_u_xhat * mean_a_xhat + sum_z_xhat / m;
      for (int64_t k = 0; k < s.per_group; ++k) {
        const int64_t channel = group * s.per_group + k, row = (sample * s.c + channel) * hw;
        const double g = gamma ? gamma[channel] : 1.0;
        const double pc = p ? p[sample * s.c + channel] : 0.0, qc = q ? q[sample * s.c + channel] : 0.0;
        // sum_hw r P(u) gy, from the channel sums of pass 1
        d_w[sample * s.c + channel] =
            static_cast<T>(r * (channel_u_gy[k] - mean_u * channel_gy[k] - mean_u_xhat * r * channel_gy_d[k]));
        // Per element, in T: coefficients of u, gy, x_hat and a constant.
        const T rt = static_cast<T>(r), mu_u = static_cast<T>(mean_u), mu_ux = static_cast<T>(mean_u_xhat);
        const T gy_coef_gy = static_cast<T>(pc), gy_const = static_cast<T>(qc), gy_r_gamma = static_cast<T>(g * r);
        const T w_u = static_cast<T>(-r * mean_a_xhat), w_gy = static_cast<T>(-r * g * mean_u_xhat + pc);
        const T w_const = static_cast<T>(-mean_w), w_xhat = static_cast<T>(-mean_w_xhat - t * r);
        if (u) {
#pragma omp simd
          for (int64_t i = 0; i < hw; ++i) {
            const T xhat = (x[row + i] - mu) * rt;
            d_gy[row + i] = gy_r_gamma * (u[row + i] - mu_u - xhat * mu_ux) + gy_coef_gy * xhat + gy_const;
            d_x[row + i] = rt * (w_u * u[row + i] + w_gy * gy[row + i] + w_const + w_xhat * xhat);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < hw; ++i) {
            const T xhat = (x[row + i] - mu) * rt;
            d_gy[row + i] = gy_r_gamma * (-mu_u - xhat * mu_ux) + gy_coef_gy * xhat + gy_const;
            d_x[row + i] = rt * (w_gy * gy[row + i] + w_const + w_xhat * xhat);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight, int64_t groups) {
  const GroupShape s = check_inputs("group_norm_backward", grad_out, x, mean, rstd, weight, groups);
  const at::Tensor gy = grad_out.contiguous(), xc = x.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor gamma = contiguous_or_undefined(weight);
  at::Tensor gx = at::empty_like(xc), gw = at::empty({s.n, s.c}, xc.options()), gb = at::empty({s.n, s.c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "group_norm_backward", [&] {
    backward_kernel<scalar_t>(s, gy.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                              r.data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma), gx.data_ptr<scalar_t>(),
                              gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, int64_t groups, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q) {
  const char* fn = "group_norm_double_backward";
  const GroupShape s = check_inputs(fn, grad_out, x, mean, rstd, weight, groups);
  norm_args::check_like_x(fn, u, x);
  norm_args::check_holds(fn, "p and q", "N * C", s.n * s.c, x, {&p, &q});
  const at::Tensor gy = grad_out.contiguous(), xc = x.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor gamma = contiguous_or_undefined(weight), uc = contiguous_or_undefined(u),
                   pc = contiguous_or_undefined(p), qc = contiguous_or_undefined(q);
  at::Tensor d_gy = at::empty_like(xc), d_x = at::empty_like(xc), d_w = at::empty({s.n, s.c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "group_norm_double_backward", [&] {
    double_backward_kernel<scalar_t>(s, gy.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                                     r.data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma),
                                     data_or_null<scalar_t>(uc), data_or_null<scalar_t>(pc),
                                     data_or_null<scalar_t>(qc), d_gy.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
                                     d_w.data_ptr<scalar_t>());
  });
  return {d_gy, d_x, d_w};
}

}  // namespace nio_fast
