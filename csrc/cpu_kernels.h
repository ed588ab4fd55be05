// Raw-pointer CPU kernels behind gram_forward / gram_backward / tensor_dots.
//
// The same kernel source (cpu_kernels_impl.h) is compiled once for the
// baseline instruction set and once for AVX2+FMA+F16C; the variant is picked
// at run time so one build runs everywhere and is fast where AVX2 exists.
#pragma once

#include <cstdint>

namespace nio_fast {
namespace cpu {

struct KernelTable {
  const char* name;

  // Gram accumulation: for every pair i <= j of the D rows, adds
  // sum_k rows[i][k] * rows[j][k] (k < n) into lane accumulators `acc`
  // (gram_acc_size(D) elements, zero-initialised by the caller).
  // gram_flush adds the lane sums into the upper triangle of the row-major
  // D x D double matrix `gram` and zeroes `acc`.
  int64_t (*gram_acc_size_f32)(int D);
  void (*gram_accumulate_f32)(const float* const* rows, int D, int64_t n, float* acc);
  void (*gram_flush_f32)(float* acc, int D, double* gram);
  int64_t (*gram_acc_size_f64)(int D);
  void (*gram_accumulate_f64)(const double* const* rows, int D, int64_t n, double* acc);
  void (*gram_flush_f64)(double* acc, int D, double* gram);

  // Gram backward: out[d][k] = sum_j S[d * D + j] * in[j][k] for k < n.
  void (*combine_f32)(const float* const* in, int D, int64_t n, const float* S, float* const* out);
  void (*combine_f64)(const double* const* in, int D, int64_t n, const double* S, double* const* out);

  // <a, b> over n elements; the f32 version accumulates in float lanes, so
  // callers keep n moderate (a few thousand) and sum the results in double.
  double (*dot_f32)(const float* a, const float* b, int64_t n);
  double (*dot_f64)(const double* a, const double* b, int64_t n);

  // Staging conversions for half / bfloat16 data (IEEE round-to-nearest-even).
  void (*half_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_half)(const float* src, uint16_t* dst, int64_t n);
  void (*bfloat16_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_bfloat16)(const float* src, uint16_t* dst, int64_t n);
};

// The kernels in use: AVX2 when the CPU supports it, else baseline, unless
// overridden with set_kernel_variant.
const KernelTable& active_kernels();

// "auto", "baseline" or "avx2"; returns false (and changes nothing) when the
// variant is unknown or unsupported on this CPU / build. For tests.
bool set_kernel_variant(const char* name);

// The table of one variant: the kernels cpu_kernels_impl.h defined inside namespace `variant`
// (in its anonymous namespace) and the variant's half conversions. A macro because the variants
// differ only in the namespace their kernels were compiled into.
#define NIO_FAST_VARIANT_TABLE(variant, variant_name, half_to_float_fn, float_to_half_fn) \
  [] {                                                                                   \
    KernelTable table;                                                                   \
    table.name = variant_name;                                                           \
    table.gram_acc_size_f32 = variant::gram_acc_size_f32;                                \
    table.gram_accumulate_f32 = variant::gram_accumulate_f32;                            \
    table.gram_flush_f32 = variant::gram_flush_f32;                                      \
    table.gram_acc_size_f64 = variant::gram_acc_size_f64;                                \
    table.gram_accumulate_f64 = variant::gram_accumulate_f64;                            \
    table.gram_flush_f64 = variant::gram_flush_f64;                                      \
    table.combine_f32 = variant::combine_f32;                                            \
    table.combine_f64 = variant::combine_f64;                                            \
    table.dot_f32 = variant::dot_f32;                                                    \
    table.dot_f64 = variant::dot_f64;                                                    \
    table.half_to_float = half_to_float_fn;                                              \
    table.float_to_half = float_to_half_fn;                                              \
    table.bfloat16_to_float = variant::bfloat16_to_float_impl;                           \
    table.float_to_bfloat16 = variant::float_to_bfloat16_impl;                           \
    return table;                                                                        \
  }()

// Variants compiled into this build (defined in cpu_kernels_*.cpp).
KernelTable make_baseline_kernels();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NIO_FAST_HAVE_AVX2_VARIANT 1
KernelTable make_avx2_kernels();
#endif

}  // namespace cpu
}  // namespace nio_fast
