// Torch-facing side of the CUDA chunk reductions (chunk_reduce_cuda.cu):
// allocates the output and launches on the current stream. The caller
// (chunk_reduce.cpp) has checked shapes, dtypes and devices and made every
// input contiguous. Compiled only in CUDA builds (setup.py adds NIO_FAST_WITH_CUDA).
#ifdef NIO_FAST_WITH_CUDA

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include "chunk_reduce_cuda.h"
#include "cuda_ops.h"

namespace nio_fast {
namespace {

// Kernels take float32 / float64; the launchers reject the other codes.
DtypeCode chunk_dtype_code(const at::Tensor& data, const char* fn) {
  return dtype_code_of(data.scalar_type(), fn, "the data");
}

void check_launch(cudaError_t status, const char* fn) {
  TORCH_CHECK(status == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace

at::Tensor chunk_row_sums_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                               const at::Tensor& weights) {
  constexpr const char* fn = "chunk_row_sums";
  const c10::cuda::CUDAGuard device_guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = offsets.numel() - 1;
  const int64_t k = values.size(1);
  at::Tensor out = at::empty({rows, k}, values.options());
  check_launch(cuda::launch_chunk_row_sums(values.const_data_ptr(), k, offsets.const_data_ptr<int64_t>(),
                                           indices.const_data_ptr<int64_t>(), weights.const_data_ptr(), rows,
                                           chunk_dtype_code(values, fn), out.mutable_data_ptr(), stream),
               fn);
  return out;
}

}  // namespace nio_fast

#endif  // NIO_FAST_WITH_CUDA
