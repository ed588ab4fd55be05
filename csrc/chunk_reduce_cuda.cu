// Chunk reductions W M W^T and W V (see chunk_reduce_cuda.h). R (the number of
// chunks) is small, so one thread per output element is enough parallelism
// for the sandwich and keeps each sum in one thread, in a fixed order.
#include "chunk_reduce_cuda.h"

#include "cuda_element.cuh"

namespace nio_fast {
namespace cuda {
namespace {

using detail::fma_acc;
using detail::kThreads;

// Sandwich: square thread blocks over the [R, R] output, threadIdx.x along s
// so a warp's stores to one output row are contiguous.
constexpr int kSandwichTile = 16;
static_assert(kSandwichTile * kSandwichTile == kThreads, "sandwich blocks are kThreads threads");

// CUDA grid limits: gridDim.x up to 2^31 - 1, gridDim.y up to 65535.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-bit data would need a wider accumulator and output than the data's dtype.
bool supported(DtypeCode dtype) { return dtype == DtypeCode::kFloat32 || dtype == DtypeCode::kFloat64; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_sandwich_kernel(const T* __restrict__ matrix, int64_t n, const int64_t* __restrict__ offsets,
                          const int64_t* __restrict__ indices, const T* __restrict__ weights, int64_t rows,
                          T* __restrict__ out) {
  const int64_t s = int64_t(blockIdx.x) * kSandwichTile + threadIdx.x;
  const int64_t r = int64_t(blockIdx.y) * kSandwichTile + threadIdx.y;
  if (r >= rows || s >= rows) return;
  const int64_t s_begin = offsets[s];
  const int64_t s_end = offsets[s + 1];
  const int64_t r_begin = offsets[r];
  const int64_t r_end = offsets[r + 1];
  T total = T(0);
  for (int64_t a = r_begin; a < r_end; ++a) {
    // Row indices[a] of M against row s of W, then weighted by entry a.
    const T* matrix_row = matrix + indices[a] * n;
    T inner = T(0);
    for (int64_t b = s_begin; b < s_end; ++b) inner = fma_acc(weights[b], matrix_row[indices[b]], inner);
    total = fma_acc(weights[a], inner, total);
  }
  out[r * rows + s] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_row_sums_kernel(const T* __restrict__ values, int64_t k, const int64_t* __restrict__ offsets,
                          const int64_t* __restrict__ indices, const T* __restrict__ weights,
                          T* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t r = blockIdx.y;
  if (j >= k) return;
  const int64_t r_begin = offsets[r];
  const int64_t r_end = offsets[r + 1];
  T total = T(0);
  // Every thread of the block reads the same index and weight (broadcast);
  // the value loads of consecutive threads are consecutive columns (coalesced).
  for (int64_t a = r_begin; a < r_end; ++a)
    total = fma_acc(weights[a], values[indices[a] * k + j], total);
  out[r * k + j] = total;
}

template <typename T>
cudaError_t launch_sandwich_typed(const void* matrix, int64_t n, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, void* out, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(rows, kSandwichTile));
  chunk_sandwich_kernel<T><<<dim3(tiles, tiles), dim3(kSandwichTile, kSandwichTile), 0, stream>>>(
      static_cast<const T*>(matrix), n, offsets, indices, static_cast<const T*>(weights), rows, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_row_sums_typed(const void* values, int64_t k, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, void* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(k, kThreads)), static_cast<unsigned>(rows));
  chunk_row_sums_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(values), k, offsets, indices,
                                                          static_cast<const T*>(weights), static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_chunk_sandwich(const void* matrix, int64_t n, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, DtypeCode dtype, void* out, cudaStream_t stream) {
  if (!supported(dtype) || rows < 0 || n < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // The same tile count goes to x and y; y has the lower limit.
  if (ceil_div(rows, kSandwichTile) > kMaxGridY) return cudaErrorInvalidValue;
  switch (dtype) {
    case DtypeCode::kFloat32:
      return launch_sandwich_typed<float>(matrix, n, offsets, indices, weights, rows, out, stream);
    case DtypeCode::kFloat64:
      return launch_sandwich_typed<double>(matrix, n, offsets, indices, weights, rows, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_chunk_row_sums(const void* values, int64_t k, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, DtypeCode dtype, void* out, cudaStream_t stream) {
  if (!supported(dtype) || rows < 0 || k < 0) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (rows > kMaxGridY || ceil_div(k, kThreads) > kMaxGridX) return cudaErrorInvalidValue;
  switch (dtype) {
    case DtypeCode::kFloat32:
      return launch_row_sums_typed<float>(values, k, offsets, indices, weights, rows, out, stream);
    case DtypeCode::kFloat64:
      return launch_row_sums_typed<double>(values, k, offsets, indices, weights, rows, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace nio_fast
