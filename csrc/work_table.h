// The work table the GPU kernels walk: per-tensor base addresses and rows of
// (tensor index, first element, element count).
#pragma once

#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#include "gradient_list.h"

namespace nio_fast {

constexpr int64_t kWorkRowFields = 3;

// Rows for tensors of the given sizes: each numel covered in order by
// chunks of `block` elements (the last one may be shorter); no rows for empty tensors.
int64_t count_work_rows(const std::vector<int64_t>& numels, int64_t block);
// Writes count_work_rows(numels, block) rows to `rows`; `tensor_index[i]` is
// stored as the tensor index of numels[i] (the identity when empty).
void fill_work_rows(const std::vector<int64_t>& numels, int64_t block, const std::vector<int64_t>& tensor_index,
                    int64_t* rows);

// One int64 host buffer -> `device` with a single copy (pinned and
// asynchronous for CUDA).
at::Tensor upload_int64(const std::vector<int64_t>& host, c10::Device device);

// addresses: int64 [P, D], byte address of the first element of grads[d][p];
// rows: int64 [R, 3]. For one dtype group of already walkable tensors.
std::tuple<at::Tensor, at::Tensor> build_work_table(const GradientList& grads, int64_t block);

}  // namespace nio_fast
