// The chunk row sums W V on the CPU, and the device dispatch (CUDA kernel in
// chunk_reduce_cuda.cu when built with CUDA); the sandwich W M W^T is two of
// them. Each output element is summed by one thread in a fixed order: results
// do not depend on the thread count.
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

// out[r, :] = sum_a w_a V[i_a, :], parallel over (column block, row) tasks, block-major: a
// thread takes consecutive rows of one column block, so the V rows several (overlapping) chunks
// share are read from cache, not memory, the second time.
template <typename T>
void row_sums_cpu(const T* values, int64_t k, const SparseRows& rows, const T* weights, T* out) {
  constexpr int64_t kColumns = 1024;  // 4-8 KB per V row: a block of a few hundred rows stays in L2
  const int64_t num_rows = static_cast<int64_t>(rows.offsets.size()) - 1;
  const int64_t blocks = (k + kColumns - 1) / kColumns;
  at::parallel_for(0, num_rows * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task % num_rows, first = (task / num_rows) * kColumns;
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

}  // namespace

at::Tensor chunk_sandwich(const at::Tensor& matrix, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights) {
  TORCH_CHECK_VALUE(matrix.dim() == 2 && matrix.size(0) == matrix.size(1),
                    "chunk_sandwich: matrix must be square [N, N], got ", matrix.sizes());
  // W M W^T as two row reductions, L = W M [R, N] and then (W L^T)^T: nnz (N + R) multiply-adds
  // over contiguous rows. Summing w_a w_b M[i_a, i_b] pair by pair costs nnz^2 scattered reads:
  // 18x slower than the dense matmuls at N = 256, D = 16, overlap 0.5 (nnz = 1896).
  const at::Tensor left = chunk_row_sums(matrix, offsets, indices, weights);
  return chunk_row_sums(left.t().contiguous(), offsets, indices, weights).t().contiguous();
}

at::Tensor chunk_row_sums(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights) {
  constexpr const char* fn = "chunk_row_sums";
  c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(values.dim() == 2, fn, ": values must be 2-d [N, K], got ", values.sizes());
  check_rows(fn, values, offsets, indices, weights);
#ifdef NIO_FAST_WITH_CUDA
  if (values.is_cuda()) {
    return chunk_row_sums_cuda(values.contiguous(), offsets.contiguous(), indices.contiguous(), weights.contiguous());
  }
#endif
  TORCH_CHECK(values.is_cpu(), fn, ": tensors on ", values.device(), " are not supported (CPU",
#ifdef NIO_FAST_WITH_CUDA
              " and CUDA",
#endif
              " only)");
  const SparseRows rows = host_rows(fn, offsets, indices, values.size(0));
  const at::Tensor v = values.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty({offsets.numel() - 1, values.size(1)}, values.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), fn, [&] {
    row_sums_cpu<scalar_t>(v.data_ptr<scalar_t>(), v.size(1), rows, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace nio_fast
