// Plain-CUDA per-tensor dot products over a work table with D = 2
// (addresses [P, 2] = (a[p], b[p])), no PyTorch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype_code.h"

namespace nio_fast {
namespace cuda {

// row_dots[r] = <a, b> over row r of `rows` (one dtype for a and b): fp32
// accumulation per thread (fp64 for double), combined in double.
cudaError_t launch_tensor_dot_rows(const int64_t* addresses, const int64_t* rows, int64_t num_rows, DtypeCode dtype,
                                   double* row_dots, cudaStream_t stream);

// out[s] = sum of row_dots[first_row[s] .. first_row[s] + row_count[s]) in a
// fixed order, for s < num_segments (0 for an empty segment).
cudaError_t launch_segment_sums(const double* row_dots, const int64_t* first_row, const int64_t* row_count,
                                int64_t num_segments, double* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace nio_fast
