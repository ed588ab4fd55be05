// Per-tensor dot products: one thread block per work row writes that row's
// dot; a second kernel sums each tensor's rows in order (deterministic).
#include "tensor_dots_cuda.h"

#include "cuda_element.cuh"

namespace nio_fast {
namespace cuda {
namespace {

using detail::block_sum_store;
using detail::element_pointer;
using detail::fma_acc;
using detail::kThreads;
using detail::load_as;

template <typename Storage, typename Acc>
__global__ void __launch_bounds__(kThreads)
    tensor_dot_rows_kernel(const int64_t* __restrict__ addresses, const int64_t* __restrict__ rows,
                           double* __restrict__ row_dots) {
  const int64_t r = blockIdx.x;
  const int64_t p = rows[3 * r];
  const int64_t first = rows[3 * r + 1];
  const int64_t count = rows[3 * r + 2];
  const Storage* a = element_pointer<Storage>(addresses, 2 * p) + first;
  const Storage* b = element_pointer<Storage>(addresses, 2 * p + 1) + first;
  Acc sum[1] = {Acc(0)};
#pragma unroll 4
  for (int64_t e = threadIdx.x; e < count; e += kThreads) sum[0] = fma_acc(load_as<Acc>(a + e), load_as<Acc>(b + e), sum[0]);
  block_sum_store<1>(sum, row_dots + r);
}

__global__ void __launch_bounds__(kThreads)
    segment_sums_kernel(const double* __restrict__ row_dots, const int64_t* __restrict__ first_row,
                        const int64_t* __restrict__ row_count, double* __restrict__ out) {
  const int64_t segment = blockIdx.x;
  const double* values = row_dots + first_row[segment];
  const int64_t count = row_count[segment];
  double sum[1] = {0.0};
  for (int64_t k = threadIdx.x; k < count; k += kThreads) sum[0] += values[k];
  block_sum_store<1>(sum, out + segment);
}

template <typename Storage, typename Acc>
cudaError_t launch_rows_typed(const int64_t* addresses, const int64_t* rows, int64_t num_rows, double* row_dots,
                              cudaStream_t stream) {
  tensor_dot_rows_kernel<Storage, Acc><<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(addresses, rows,
                                                                                                 row_dots);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tensor_dot_rows(const int64_t* addresses, const int64_t* rows, int64_t num_rows, DtypeCode dtype,
                                   double* row_dots, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  if (num_rows > 0x7fffffff) return cudaErrorInvalidValue;  // grid.x limit
  switch (dtype) {
    case DtypeCode::kFloat32: return launch_rows_typed<float, float>(addresses, rows, num_rows, row_dots, stream);
    case DtypeCode::kFloat16: return launch_rows_typed<__half, float>(addresses, rows, num_rows, row_dots, stream);
    case DtypeCode::kBFloat16:
      return launch_rows_typed<__nv_bfloat16, float>(addresses, rows, num_rows, row_dots, stream);
    case DtypeCode::kFloat64: return launch_rows_typed<double, double>(addresses, rows, num_rows, row_dots, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_segment_sums(const double* row_dots, const int64_t* first_row, const int64_t* row_count,
                                int64_t num_segments, double* out, cudaStream_t stream) {
  if (num_segments <= 0) return cudaSuccess;
  if (num_segments > 0x7fffffff) return cudaErrorInvalidValue;
  segment_sums_kernel<<<static_cast<unsigned>(num_segments), kThreads, 0, stream>>>(row_dots, first_row, row_count,
                                                                                    out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nio_fast
