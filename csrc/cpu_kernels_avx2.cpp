// AVX2 + FMA + F16C CPU kernels, compiled for that target with a pragma (not
// a global -mavx2) and only called after a run-time CPU check, so the
// extension still loads and runs on CPUs without AVX2.
#include <cstdint>

#include "cpu_kernels.h"

#if defined(NIO_FAST_HAVE_AVX2_VARIANT)

#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace nio_fast {
namespace cpu {
namespace avx2_variant {

#define NIO_VEC_BYTES 32
#define NIO_FMA_F32(acc, a, b) ((VecF32)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(acc)))
#define NIO_FMA_F64(acc, a, b) ((VecF64)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(acc)))
// Register tiles, measured in cache on one core (Zen 3, D = 64, GFMA/s):
// Gram 3x4 26.1 (12 accumulators + 4 loads = 16 ymm; the 3 row loads fold
// into FMA memory operands), 4x3 20.9, 2x6 17.6, 4x2 15.1, 2x4 12.8;
// backward 4 outputs x 2 vectors ~23, 6x2 ~24 (noise), 2x4 18, 4x3 12 (spills).
// Versus the baseline variant: D = 4 Gram 30.6 vs 18.4, D = 64 26.1 vs 16.1.
// All-pairs Gram up to D = 7: streaming from memory (GFMA/s, all-pairs vs
// tiled) D = 5 9.9 vs 4.7, 6 12.9 vs 6.3, 7 10.0 vs 6.2, 8 10.7 vs 9.3 / 7.3 vs 7.4.
// Overridable (-D...) for re-tuning.
#ifndef NIO_SMALL_GRAM_MAX_DIM
#define NIO_SMALL_GRAM_MAX_DIM 7
#endif
#ifndef NIO_GRAM_TILE_I
#define NIO_GRAM_TILE_I 3
#define NIO_GRAM_TILE_J 4
#endif
#ifndef NIO_COMBINE_TILE_OUT
#define NIO_COMBINE_TILE_OUT 4
#define NIO_COMBINE_TILE_VECS 2
#endif
#include "cpu_kernels_impl.h"

namespace {

void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));
  }
  for (; k < n; ++k) dst[k] = _cvtsh_ss(src[k]);
}

void float_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), h);
  }
  for (; k < n; ++k) dst[k] = _cvtss_sh(src[k], _MM_FROUND_TO_NEAREST_INT);
}

}  // namespace
}  // namespace avx2_variant
}  // namespace cpu
}  // namespace nio_fast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace nio_fast {
namespace cpu {

// Outside the target region: only takes addresses, runs on any CPU.
KernelTable make_avx2_kernels() {
  return NIO_FAST_VARIANT_TABLE(avx2_variant, "avx2", avx2_variant::half_to_float_f16c,
                                avx2_variant::float_to_half_f16c);
}

}  // namespace cpu
}  // namespace nio_fast

#endif  // NIO_FAST_HAVE_AVX2_VARIANT
