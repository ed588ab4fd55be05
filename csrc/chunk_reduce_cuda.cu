// Chunk row sums W V (see chunk_reduce_cuda.h): one thread per output element,
// which keeps each sum in one thread, in a fixed order; a block's threads take
// consecutive columns of one output row.
#include "chunk_reduce_cuda.h"

#include "cuda_element.cuh"

namespace nio_fast {
namespace cuda {
namespace {

using detail::fma_acc;
using detail::kThreads;

// CUDA grid limits: gridDim.x up to 2^31 - 1, gridDim.y up to 65535.
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-bit data would need a wider accumulator and output than the data's dtype.
bool supported(DtypeCode dtype) { return dtype == DtypeCode::kFloat32 || dtype == DtypeCode::kFloat64; }

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
cudaError_t launch_row_sums_typed(const void* values, int64_t k, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, void* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(k, kThreads)), static_cast<unsigned>(rows));
  chunk_row_sums_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(values), k, offsets, indices,
                                                          static_cast<const T*>(weights), static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

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
