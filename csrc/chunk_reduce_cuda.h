// Plain-CUDA chunk row sums W V over a sparse R x N matrix W in CSR form, no
// PyTorch headers (nvcc builds chunk_reduce_cuda.cu alone). The sandwich
// W M W^T is two of them (chunk_reduce.cpp).
//
// W is given by
//   offsets [R + 1] int64: row r's entries are a in [offsets[r], offsets[r + 1])
//                          (offsets[0] = 0, nondecreasing)
//   indices [nnz] int64:   the column of entry a, in [0, N)
//   weights [nnz]:         its value, in the data's dtype
// all in device memory. A row may be empty, and a column may appear in several
// rows or several times in one row. Only float32 and float64 data are handled;
// sums run in the data's dtype. Every output element is written by one thread
// that sums in a fixed order: deterministic, no atomics.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype_code.h"

namespace nio_fast {
namespace cuda {

// out [rows, k] = W V for values V [N, k] (row-major, row stride k):
//   out[r, :] = sum_{a in row r} weights[a] * V[indices[a], :].
// Writes every element (zeros for empty rows). cudaErrorInvalidValue for a
// dtype other than float32 / float64 or sizes beyond the grid limits;
// cudaSuccess without a launch when rows == 0 or k == 0.
cudaError_t launch_chunk_row_sums(const void* values, int64_t k, const int64_t* offsets, const int64_t* indices,
                                  const void* weights, int64_t rows, DtypeCode dtype, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace nio_fast
