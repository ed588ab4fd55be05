// Plain-CUDA Gram kernels over a work table (see work_table.h): raw pointers
// and a stream only, so this header and gram_cuda.cu build without PyTorch.
//
// A work table for one dtype group is
//   addresses [P, D] int64: byte address of the first element of gradient d's tensor p
//   rows      [R, 3] int64: (tensor index p, first element, element count)
// and every launcher reads both from device memory.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype_code.h"

namespace nio_fast {
namespace cuda {

// The kernels keep per-thread state for at most this many gradients.
constexpr int kMaxGramDim = 64;

// Entries of one partial Gram: the upper triangle i <= j, row-major.
inline int64_t gram_pair_count(int D) { return int64_t(D) * (D + 1) / 2; }

// Thread blocks launch_gram_forward uses for num_rows rows, i.e. how many
// partial Grams it writes. Depends only on (num_rows, D): results are the
// same on every GPU and every run.
int64_t gram_forward_num_blocks(int64_t num_rows, int D);

// Writes gram_forward_num_blocks(num_rows, D) partial Grams (each
// gram_pair_count(D) doubles) to block_partials. fp32 accumulation within a
// thread for half / bfloat16 / float, fp64 for double; threads are combined in double.
cudaError_t launch_gram_forward(const int64_t* addresses, const int64_t* rows, int64_t num_rows, int D,
                                DtypeCode dtype, double* block_partials, cudaStream_t stream);

// gram [D, D] (row-major, symmetric, doubles) = sum of num_partials partial
// Grams, in a fixed order (deterministic). num_partials may be 0 (zeros).
cudaError_t launch_gram_reduce(const double* partials, int64_t num_partials, int D, double* gram,
                               cudaStream_t stream);

// out[d] = sum_j S[d, j] * in[j] on every row: in_addresses and out_addresses
// are [P, D] tables sharing `rows`; S is D x D row-major doubles on the device.
// Math in fp32 (fp64 for double), stored in the tensors' dtype.
cudaError_t launch_gram_backward(const int64_t* in_addresses, const int64_t* out_addresses, const int64_t* rows,
                                 int64_t num_rows, int D, DtypeCode dtype, const double* S, cudaStream_t stream);

}  // namespace cuda
}  // namespace nio_fast
