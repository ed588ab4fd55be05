// CPU kernels of the chunk reductions, and the device dispatch (CUDA kernels in
// chunk_reduce_cuda.cu when built with CUDA). Each output element is summed by
// one thread in a fixed order: results do not depend on the thread count.
#include "chunk_reduce.h"

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#ifdef NIO_FAST_WITH_CUDA
#include "cuda_ops.h"
#endif

namespace nio_fast {
namespace {

// Rows of W, validated: offsets nondecreasing from 0 to nnz, indices in [0, n).
struct SparseRows {
  std::vector<int64_t> offsets, indices;
};

void check_rows(const char* fn, const at::Tensor& data, const at::Tensor& offsets, const at::Tensor& indices,
                const at::Tensor& weights) {
  TORCH_CHECK_TYPE(data.scalar_type() == at::kFloat || data.scalar_type() == at::kDouble, fn,
                   ": expected float32 or float64 data, got ", data.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.scalar_type() == at::kLong, fn,
                    ": offsets must be a 1-d int64 tensor [R + 1], got ", offsets.scalar_type(), " ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.scalar_type() == at::kLong, fn,
                    ": indices must be a 1-d int64 tensor, got ", indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == indices.numel(), fn, ": weights must be 1-d with ",
                    indices.numel(), " entries (one per index), got ", weights.sizes());
  TORCH_CHECK_TYPE(weights.scalar_type() == data.scalar_type(), fn, ": weights have dtype ", weights.scalar_type(),
                   " but the data ", data.scalar_type());
  for (const at::Tensor* t : {&offsets, &indices, &weights}) {
    TORCH_CHECK_VALUE(t->device() == data.device(), fn, ": the rows are on ", t->device(), " but the data on ",
                      data.device());
  }
}

SparseRows host_rows(const char* fn, const at::Tensor& offsets, const at::Tensor& indices, int64_t samples) {
  const at::Tensor o = offsets.contiguous(), i = indices.contiguous();
  SparseRows rows{std::vector<int64_t>(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel()),
                  std::vector<int64_t>(i.data_ptr<int64_t>(), i.data_ptr<int64_t>() + i.numel())};
  TORCH_CHECK_VALUE(rows.offsets.front() == 0 && rows.offsets.back() == static_cast<int64_t>(rows.indices.size()),
                    fn, ": offsets must run from 0 to len(indices) = ", rows.indices.size());
  for (size_t r = 1; r < rows.offsets.size(); ++r) {
    TORCH_CHECK_VALUE(rows.offsets[r] >= rows.offsets[r - 1], fn, ": offsets must be nondecreasing (offsets[",
                      r, "] < offsets[", r - 1, "])");
  }
  for (int64_t index : rows.indices) {
    TORCH_CHECK_VALUE(0 <= index && index < samples, fn, ": index ", index, " is outside [0, ", samples, ")");
  }
  return rows;
}

// out[r, s] = sum_a sum_b w_a w_b M[i_a, i_b]: for row r, first t[b] = sum_a w_a M[i_a, i_b]
// over all entries b (one pass over row r's rows of M), then every s from t.
template <typename T>
void sandwich_cpu(const T* matrix, int64_t n, const SparseRows& rows, const T* weights, T* out) {
  const int64_t num_rows = static_cast<int64_t>(rows.offsets.size()) - 1;
  const int64_t nnz = static_cast<int64_t>(rows.indices.size());
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> partial(nnz);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(partial.begin(), partial.end(), T(0));
      for (int64_t a = rows.offsets[r]; a < rows.offsets[r + 1]; ++a) {
        const T* line = matrix + rows.indices[a] * n;
        const T w = weights[a];
        for (int64_t b = 0; b < nnz; ++b) partial[b] += w * line[rows.indices[b]];
      }
      for (int64_t s = 0; s < num_rows; ++s) {
        T sum = 0;
        for (int64_t b = rows.offsets[s]; b < rows.offsets[s + 1]; ++b) sum += weights[b] * partial[b];
        out[r * num_rows + s] = sum;
      }
    }
  });
}

// out[r, :] = sum_a w_a V[i_a, :], parallel over rows and column blocks.
template <typename T>
void row_sums_cpu(const T* values, int64_t k, const SparseRows& rows, const T* weights, T* out) {
  constexpr int64_t kColumns = 4096;  // a block of columns stays in L1/L2 while row r's entries add in
  const int64_t num_rows = static_cast<int64_t>(rows.offsets.size()) - 1;
  const int64_t blocks = (k + kColumns - 1) / kColumns;
  at::parallel_for(0, num_rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / blocks, first = (task % blocks) * kColumns;
      const int64_t count = std::min(kColumns, k - first);
      T* target = out + r * k + first;
      std::fill(target, target + count, T(0));
      for (int64_t a = rows.offsets[r]; a < rows.offsets[r + 1]; ++a) {
        const T* source = values + rows.indices[a] * k + first;
        const T w = weights[a];
        for (int64_t j = 0; j < count; ++j) target[j] += w * source[j];
      }
    }
  });
}

// Checks, then the CUDA kernel (CUDA builds) or `cpu_kernel(data, row_length, rows, weights, out)`
// into a fresh [R, out_columns] tensor.
template <typename CudaOp, typename CpuKernel>
at::Tensor run(const char* fn, const at::Tensor& data, const at::Tensor& offsets, const at::Tensor& indices,
               const at::Tensor& weights, int64_t out_columns, CudaOp cuda_op, CpuKernel cpu_kernel) {
  c10::NoGradGuard no_grad;
  check_rows(fn, data, offsets, indices, weights);
#ifdef NIO_FAST_WITH_CUDA
  if (data.is_cuda()) return cuda_op(data.contiguous(), offsets.contiguous(), indices.contiguous(), weights.contiguous());
#else
  (void)cuda_op;
#endif
  TORCH_CHECK(data.is_cpu(), fn, ": tensors on ", data.device(), " are not supported (CPU",
#ifdef NIO_FAST_WITH_CUDA
              " and CUDA",
#endif
              " only)");
  const SparseRows rows = host_rows(fn, offsets, indices, data.size(0));
  const at::Tensor d = data.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty({offsets.numel() - 1, out_columns}, data.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "chunk_reduce", [&] {  // dtype checked above
    cpu_kernel(d.data_ptr<scalar_t>(), d.size(1), rows, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

#ifdef NIO_FAST_WITH_CUDA
#define NIO_FAST_CUDA_OP(op) op
#else
#define NIO_FAST_CUDA_OP(op) nullptr
#endif

}  // namespace

at::Tensor chunk_sandwich(const at::Tensor& matrix, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights) {
  TORCH_CHECK_VALUE(matrix.dim() == 2 && matrix.size(0) == matrix.size(1),
                    "chunk_sandwich: matrix must be square [N, N], got ", matrix.sizes());
  return run("chunk_sandwich", matrix, offsets, indices, weights, offsets.numel() - 1,
             NIO_FAST_CUDA_OP(chunk_sandwich_cuda),
             [](const auto* m, int64_t n, const SparseRows& rows, const auto* w, auto* out) {
               sandwich_cpu(m, n, rows, w, out);
             });
}

at::Tensor chunk_row_sums(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights) {
  TORCH_CHECK_VALUE(values.dim() == 2, "chunk_row_sums: values must be 2-d [N, K], got ", values.sizes());
  return run("chunk_row_sums", values, offsets, indices, weights, values.size(1),
             NIO_FAST_CUDA_OP(chunk_row_sums_cuda),
             [](const auto* v, int64_t k, const SparseRows& rows, const auto* w, auto* out) {
               row_sums_cpu(v, k, rows, w, out);
             });
}

}  // namespace nio_fast
