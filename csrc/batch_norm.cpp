// BatchNorm backward and its derivative with batch statistics, CPU (see
// batch_norm.h). One task per channel; pass 1 sums over the channel's N rows of
// HW elements (vectorised within a row, accumulated in double across rows),
// pass 2 writes the outputs. It is GroupNorm's algebra (group_norm.cpp) with a
// group of M = N * HW elements per channel and one gamma for all of them:
// x_hat = (x - mean) r, a = gamma gy, P(z) = z - mean(z) - x_hat mean(x_hat z):
//   grad_x   = r P(a),  grad_weight = sum gy x_hat,  grad_bias = sum gy
//   VJP with (u, p, q):
//   d gy     = gamma r P(u) + p x_hat + q
//   d weight = sum r P(u) gy
//   d x      = r P(w) - t r^2 x_hat,  w = -r (u mean(a x_hat) + a mean(u x_hat)) + p gy,
//              t = mean(u P(a))
#include "batch_norm.h"

#include <cmath>
#include <limits>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "norm_args.h"

namespace nio_fast {
namespace {

using norm_args::contiguous_or_undefined;
using norm_args::data_or_null;

struct ChannelShape {
  int64_t n, c, hw;
};

ChannelShape check_inputs(const char* fn, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& rstd, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() >= 2, fn, ": x must be [N, C, *], got ", x.sizes());
  norm_args::check_float_cpu(fn, x);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK_VALUE(n > 0, fn, ": x has no samples");
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), fn, ": grad_out has shape ", grad_out.sizes(), ", x ",
                    x.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->numel() == c, fn, ": mean and rstd must have C = ", c, " elements, got ", t->numel());
  }
  norm_args::check_dtype_of_x(fn, x, {&grad_out, &mean, &rstd});
  norm_args::check_holds(fn, "weight", "C", c, x, {&weight});
  const int64_t hw = c == 0 ? 0 : x.numel() / (n * c);
  return {n, c, hw};
}

// A channel's sum gy and sum gy (x - mean): vectorised within each row, in double across rows.
template <typename T>
void grad_out_sums(const ChannelShape& s, int64_t channel, const T* gy, const T* x, T mu, double& sum_gy,
                   double& sum_gy_d) {
  sum_gy = sum_gy_d = 0;
  for (int64_t sample = 0; sample < s.n; ++sample) {
    const int64_t row = (sample * s.c + channel) * s.hw;
    T s_gy = 0, s_gy_d = 0;
#pragma omp simd reduction(+ : s_gy, s_gy_d)
    for (int64_t i = 0; i < s.hw; ++i) {
      s_gy += gy[row + i];
      s_gy_d += gy[row + i] * (x[row + i] - mu);
    }
    sum_gy += s_gy;
    sum_gy_d += s_gy_d;
  }
}

template <typename T>
void backward_kernel(const ChannelShape& s, const T* gy, const T* x, const T* mean, const T* rstd, const T* gamma,
                     T* gx, T* gw, T* gb) {
  const int64_t hw = s.hw;
  const double m = static_cast<double>(s.n * hw);
  at::parallel_for(0, s.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t channel = begin; channel < end; ++channel) {
      const T mu = mean[channel], r = rstd[channel];
      double sum_gy, sum_gy_d;
      grad_out_sums(s, channel, gy, x, mu, sum_gy, sum_gy_d);
      const double g = gamma ? gamma[channel] : 1.0;
      gb[channel] = static_cast<T>(sum_gy);
      gw[channel] = static_cast<T>(r * sum_gy_d);
      const T mean_a = static_cast<T>(g * sum_gy / m), mean_a_xhat = static_cast<T>(g * r * sum_gy_d / m);
      const T gt = static_cast<T>(g);
      for (int64_t sample = 0; sample < s.n; ++sample) {
        const int64_t row = (sample * s.c + channel) * hw;
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) {
          const T xhat = (x[row + i] - mu) * r;
          gx[row + i] = r * (gt * gy[row + i] - mean_a - xhat * mean_a_xhat);
        }
      }
    }
  });
}

// With kFromGradX, grad_out is not read but rebuilt per element from grad_x and the affine
// gradients (the backward's own outputs, which NIO keeps anyway), so the graph need not save it:
// gy = gx / (r gamma) + gb / M + x_hat gw / M, for gamma far from zero. Its channel sums are
// then gb and gw / r exactly.
template <typename T, bool kFromGradX>
void double_backward_kernel(const ChannelShape& s, const T* gy_or_gx, const T* rebuilt_gw, const T* rebuilt_gb,
                            const T* x, const T* mean, const T* rstd, const T* gamma, const T* u, const T* p,
                            const T* q, T* d_gy, T* d_x, T* d_w) {
  const int64_t hw = s.hw;
  const double m = static_cast<double>(s.n * hw);
  at::parallel_for(0, s.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t channel = begin; channel < end; ++channel) {
      const T mu = mean[channel];
      const double r = rstd[channel], g = gamma ? gamma[channel] : 1.0;
      // grad_out at element j: read, or rebuilt from grad_x (then with x_hat, computed anyway)
      const T inv_rg = static_cast<T>(kFromGradX ? 1.0 / (r * g) : 0.0);
      const T gb_m = static_cast<T>(kFromGradX ? rebuilt_gb[channel] / m : 0.0);
      const T gw_m = static_cast<T>(kFromGradX ? rebuilt_gw[channel] / m : 0.0);
      const T rt = static_cast<T>(r);
      auto grad_out_at = [&](int64_t j, T xhat) -> T {
        return kFromGradX ? gy_or_gx[j] * inv_rg + gb_m + xhat * gw_m : gy_or_gx[j];
      };
      double sum_gy = 0, sum_gy_d = 0, sum_u = 0, sum_u_d = 0, sum_u_gy = 0;
      if (kFromGradX) {  // exact: the sums the backward returned
        sum_gy = rebuilt_gb[channel];
        sum_gy_d = rebuilt_gw[channel] / r;
      } else if (!u) {
        grad_out_sums(s, channel, gy_or_gx, x, mu, sum_gy, sum_gy_d);
      }
      for (int64_t sample = 0; u && sample < s.n; ++sample) {
        const int64_t row = (sample * s.c + channel) * hw;
        T s_gy = 0, s_gy_d = 0, s_u = 0, s_u_d = 0, s_u_gy = 0;
#pragma omp simd reduction(+ : s_gy, s_gy_d, s_u, s_u_d, s_u_gy)
        for (int64_t i = 0; i < hw; ++i) {
          const T d = x[row + i] - mu, gyv = grad_out_at(row + i, d * rt);
          s_gy += gyv;
          s_gy_d += gyv * d;
          s_u += u[row + i];
          s_u_d += u[row + i] * d;
          s_u_gy += u[row + i] * gyv;
        }
        if (!kFromGradX) {
          sum_gy += s_gy;
          sum_gy_d += s_gy_d;
        }
        sum_u += s_u;
        sum_u_d += s_u_d;
        sum_u_gy += s_u_gy;
      }
      const double pc = p ? p[channel] : 0.0, qc = q ? q[channel] : 0.0;
      const double mean_a = g * sum_gy / m, mean_a_xhat = g * r * sum_gy_d / m, mean_u = sum_u / m,
                   mean_u_xhat = r * sum_u_d / m, mean_u_a = g * sum_u_gy / m;
      const double t = mean_u_a - mean_u * mean_a - mean_u_xhat * mean_a_xhat;
      const double mean_w = -r * (mean_u * mean_a_xhat + mean_a * mean_u_xhat) + pc * sum_gy / m;
      const double mean_w_xhat = -2.0 * r * mean_u_xhat * mean_a_xhat + pc * r * sum_gy_d / m;
      d_w[channel] = static_cast<T>(r * (sum_u_gy - mean_u * sum_gy - mean_u_xhat * r * sum_gy_d));
      // Per element, in T: coefficients of u, gy, x_hat and a constant.
      const T mu_u = static_cast<T>(mean_u), mu_ux = static_cast<T>(mean_u_xhat);
      const T gy_xhat = static_cast<T>(pc), gy_const = static_cast<T>(qc), gy_r_gamma = static_cast<T>(g * r);
      const T w_u = static_cast<T>(-r * mean_a_xhat), w_gy = static_cast<T>(-r * g * mean_u_xhat + pc);
      const T w_const = static_cast<T>(-mean_w), w_xhat = static_cast<T>(-mean_w_xhat - t * r);
      for (int64_t sample = 0; sample < s.n; ++sample) {
        const int64_t row = (sample * s.c + channel) * hw;
        if (u) {
#pragma omp simd
          for (int64_t i = 0; i < hw; ++i) {
            const T xhat = (x[row + i] - mu) * rt, gyv = grad_out_at(row + i, xhat);
            d_gy[row + i] = gy_r_gamma * (u[row + i] - mu_u - xhat * mu_ux) + gy_xhat * xhat + gy_const;
            d_x[row + i] = rt * (w_u * u[row + i] + w_gy * gyv + w_const + w_xhat * xhat);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < hw; ++i) {
            const T xhat = (x[row + i] - mu) * rt, gyv = grad_out_at(row + i, xhat);
            d_gy[row + i] = gy_r_gamma * (-mu_u - xhat * mu_ux) + gy_xhat * xhat + gy_const;
            d_x[row + i] = rt * (w_gy * gyv + w_const + w_xhat * xhat);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight) {
  const ChannelShape s = check_inputs("batch_norm_backward", grad_out, x, mean, rstd, weight);
  const at::Tensor gy = grad_out.contiguous(), xc = x.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor gamma = contiguous_or_undefined(weight);
  at::Tensor gx = at::empty_like(xc), gw = at::empty({s.c}, xc.options()), gb = at::empty({s.c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "batch_norm_backward", [&] {
    backward_kernel<scalar_t>(s, gy.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
                              r.data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma),
                              gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
  });
  return {gx, gw, gb};
}

namespace {

void check_cotangents(const char* fn, const ChannelShape& s, const at::Tensor& x, const at::Tensor& u,
                      const at::Tensor& p, const at::Tensor& q) {
  norm_args::check_like_x(fn, u, x);
  norm_args::check_holds(fn, "p and q", "C", s.c, x, {&p, &q});
}

template <bool kFromGradX>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_double_backward(
    const ChannelShape& s, const at::Tensor& gy_or_gx, const at::Tensor& rebuilt_gw, const at::Tensor& rebuilt_gb,
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
    const at::Tensor& u, const at::Tensor& p, const at::Tensor& q) {
  const at::Tensor g = gy_or_gx.contiguous(), xc = x.contiguous(), mu = mean.contiguous(), r = rstd.contiguous();
  const at::Tensor gamma = contiguous_or_undefined(weight), uc = contiguous_or_undefined(u),
                   pc = contiguous_or_undefined(p), qc = contiguous_or_undefined(q),
                   gw = contiguous_or_undefined(rebuilt_gw), gb = contiguous_or_undefined(rebuilt_gb);
  at::Tensor d_gy = at::empty_like(xc), d_x = at::empty_like(xc), d_w = at::empty({s.c}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "batch_norm_double_backward", [&] {
    double_backward_kernel<scalar_t, kFromGradX>(
        s, g.data_ptr<scalar_t>(), data_or_null<scalar_t>(gw), data_or_null<scalar_t>(gb), xc.data_ptr<scalar_t>(),
        mu.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma), data_or_null<scalar_t>(uc),
        data_or_null<scalar_t>(pc), data_or_null<scalar_t>(qc), d_gy.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(),
        d_w.data_ptr<scalar_t>());
  });
  return {d_gy, d_x, d_w};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& p, const at::Tensor& q) {
  const char* fn = "batch_norm_double_backward";
  const ChannelShape s = check_inputs(fn, grad_out, x, mean, rstd, weight);
  check_cotangents(fn, s, x, u, p, q);
  return run_double_backward<false>(s, grad_out, at::Tensor(), at::Tensor(), x, mean, rstd, weight, u, p, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward_from_grad_x(
    const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& u,
    const at::Tensor& p, const at::Tensor& q) {
  const char* fn = "batch_norm_double_backward_from_grad_x";
  const ChannelShape s = check_inputs(fn, grad_x, x, mean, rstd, weight);
  check_cotangents(fn, s, x, u, p, q);
  norm_args::check_holds(fn, "grad_weight and grad_bias", "C", s.c, x, {&grad_weight, &grad_bias});
  TORCH_CHECK_VALUE(grad_out_rebuildable(weight), fn,
                    ": grad_out cannot be rebuilt where weight is zero or nearly (|weight| < sqrt of the dtype's "
                    "smallest normal number)");
  return run_double_backward<true>(s, grad_x, grad_weight, grad_bias, x, mean, rstd, weight, u, p, q);
}

bool grad_out_rebuildable(const at::Tensor& weight) {
  if (!weight.defined()) return true;
  // gx / (r gamma) stays finite and keeps its precision for |gamma| well inside the normal range:
  // sqrt(min) is 1.1e-19 in float32, 1.5e-154 in float64.
  const double smallest = weight.scalar_type() == at::kFloat ? std::sqrt(std::numeric_limits<float>::min())
                                                             : std::sqrt(std::numeric_limits<double>::min());
  return weight.abs().ge(smallest).all().item<bool>();
}

}  // namespace nio_fast
