// Element loads / stores with conversion to the accumulation type, and a
// fixed-order block reduction; shared by the .cu files (plain CUDA).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nio_fast {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks
constexpr int kWarps = kThreads / 32;

template <typename Acc, typename Storage>
__device__ __forceinline__ Acc load_as(const Storage* p);
template <>
__device__ __forceinline__ float load_as<float, float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ double load_as<double, double>(const double* p) { return *p; }

template <typename Storage, typename Acc>
__device__ __forceinline__ void store_as(Storage* p, Acc v);
template <>
__device__ __forceinline__ void store_as<float, float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_as<__half, float>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_as<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ void store_as<double, double>(double* p, double v) { *p = v; }

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

template <typename Storage>
__device__ __forceinline__ const Storage* element_pointer(const int64_t* addresses, int64_t index) {
  return reinterpret_cast<const Storage*>(static_cast<uintptr_t>(addresses[index]));
}

// Sums values[q] over the block's threads for q < N (in double, fixed tree
// order) and has the first threads write the N totals to out. Every thread
// of the block must call it.
template <int N, typename Acc>
__device__ void block_sum_store(const Acc (&values)[N], double* out) {
  __shared__ double warp_sums[kWarps][N];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < N; ++q) {
    double v = static_cast<double>(values[q]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][q] = v;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < N; q += kThreads) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][q];
    out[q] = total;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace nio_fast
