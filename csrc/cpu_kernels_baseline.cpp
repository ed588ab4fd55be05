// Baseline CPU kernels: the compiler's default instruction set (SSE2 on
// x86-64, NEON on aarch64) with 16-byte vectors.
#include <cstdint>

#include "cpu_kernels.h"

namespace nio_fast {
namespace cpu {
namespace baseline_variant {

#define NIO_VEC_BYTES 16
#define NIO_FMA_F32(acc, a, b) ((acc) + (a) * (b))
#define NIO_FMA_F64(acc, a, b) ((acc) + (a) * (b))
// 16 vector registers on SSE2 (and 32 on NEON). Measured in cache on one
// core (D = 64, GFMA/s): Gram 3x4 16.1, 2x6 14.0, 4x4 13.8, 2x4 12.8;
// backward 4x2 9.6, 3x2 10.2, 2x2 7.6, 4x1 5.6. All-pairs Gram up to D = 6,
// streaming from memory (all-pairs vs tiled): D = 5 6.7 vs 3.8, 6 7.7 vs 5.0,
// 7 3.8 vs 6.0 (spills). Overridable (-D...).
#ifndef NIO_SMALL_GRAM_MAX_DIM
#define NIO_SMALL_GRAM_MAX_DIM 6
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

}  // namespace baseline_variant

// Half conversions use c10's (defined in cpu_kernels_dispatch.cpp).
void half_to_float_portable(const uint16_t* src, float* dst, int64_t n);
void float_to_half_portable(const float* src, uint16_t* dst, int64_t n);

KernelTable make_baseline_kernels() {
  return NIO_FAST_VARIANT_TABLE(baseline_variant, "baseline", half_to_float_portable, float_to_half_portable);
}

}  // namespace cpu
}  // namespace nio_fast
