// Chunk reductions of per-sample quantities, for a sparse sample-to-chunk
// weighting W given as CSR rows (row r: entries a in [offsets[r], offsets[r+1]),
// sample indices[a], weight weights[a]):
//   chunk_sandwich(M [N, N])  -> [R, R] = W M W^T  (chunk Gram from a sample Gram)
//   chunk_row_sums(V [N, K])  -> [R, K] = W V      (chunk gradients from per-sample ones)
// Both are linear in their first argument, so each one's backward is the same op
// with W's transposed rows (nio_fast/ops/chunk_reduce.py builds both).
#pragma once

#include <ATen/ATen.h>

namespace nio_fast {

at::Tensor chunk_sandwich(const at::Tensor& matrix, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights);
at::Tensor chunk_row_sums(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                          const at::Tensor& weights);

}  // namespace nio_fast
