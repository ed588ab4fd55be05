#include "work_table.h"

#include <algorithm>
#include <cstring>

#include <c10/util/Exception.h>

namespace nio_fast {

int64_t count_work_rows(const std::vector<int64_t>& numels, int64_t block) {
  int64_t rows = 0;
  for (int64_t n : numels) rows += (n + block - 1) / block;
  return rows;
}

void fill_work_rows(const std::vector<int64_t>& numels, int64_t block, const std::vector<int64_t>& tensor_index,
                    int64_t* rows) {
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t index = tensor_index.empty() ? static_cast<int64_t>(i) : tensor_index[i];
    for (int64_t first = 0; first < numels[i]; first += block) {
      rows[0] = index;
      rows[1] = first;
      rows[2] = std::min(block, numels[i] - first);
      rows += kWorkRowFields;
    }
  }
}

at::Tensor upload_int64(const std::vector<int64_t>& host, c10::Device device) {
  const int64_t n = static_cast<int64_t>(host.size());
  const bool pin = device.is_cuda();
  at::Tensor staging = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(pin));
  if (n > 0) std::memcpy(staging.mutable_data_ptr<int64_t>(), host.data(), n * sizeof(int64_t));
  if (device.is_cpu()) return staging;
  // The caching host allocator keeps pinned memory alive until the copy ran.
  return staging.to(device, /*non_blocking=*/pin);
}

std::tuple<at::Tensor, at::Tensor> build_work_table(const GradientList& grads, int64_t block) {
  constexpr const char* fn = "build_work_table";
  TORCH_CHECK_VALUE(block >= 1, fn, ": block must be >= 1 elements, got ", block);
  const WalkableGradients walkable = prepare_gradients(grads, fn, NonWalkable::kReject);
  const int64_t D = walkable.num_grads;
  const int64_t P = walkable.num_tensors;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = 0; d < D; ++d)
      TORCH_CHECK_VALUE(!grads[d][p].is_neg(), fn, ": grads[", d, "][", p,
                        "] is a lazily negated view; call resolve_neg() first");
  for (int64_t p = 1; p < P; ++p) {
    TORCH_CHECK_TYPE(walkable.dtype[p] == walkable.dtype[0], fn, ": grads[0][", p, "] has dtype ",
                     dtype_name(grads[0][p].scalar_type()), " but grads[0][0] has dtype ",
                     dtype_name(grads[0][0].scalar_type()),
                     "; a work table covers one dtype group, split the parameters by dtype first");
  }

  const int64_t num_rows = count_work_rows(walkable.numel, block);
  std::vector<int64_t> host(P * D + num_rows * kWorkRowFields);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = 0; d < D; ++d)
      host[p * D + d] = static_cast<int64_t>(reinterpret_cast<intptr_t>(grads[d][p].const_data_ptr()));
  fill_work_rows(walkable.numel, block, {}, host.data() + P * D);

  const at::Tensor table = upload_int64(host, walkable.device);
  at::Tensor addresses = table.narrow(0, 0, P * D).view({P, D});
  at::Tensor rows = table.narrow(0, P * D, num_rows * kWorkRowFields).view({num_rows, kWorkRowFields});
  return {addresses, rows};
}

}  // namespace nio_fast
