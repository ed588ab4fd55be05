// Torch-facing side of the CUDA kernels: builds the work tables on the host,
// uploads them with one copy, allocates outputs and launches on the current
// stream. Compiled only in CUDA builds (setup.py adds NIO_FAST_WITH_CUDA).
#ifdef NIO_FAST_WITH_CUDA

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda_ops.h"
#include "gram_cuda.h"
#include "tensor_dots_cuda.h"
#include "work_table.h"

namespace nio_fast {
namespace {

// Elements per work row: 256 threads x 32 elements; enough rows for ResNet-50
// (25.6M values -> ~3100 rows) to fill every SM several times.
constexpr int64_t kRowElements = 8192;

int64_t address_of(const void* pointer) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(pointer)); }

// Non-empty parameters by dtype, in first-seen order.
struct DtypeGroup {
  DtypeCode dtype;
  std::vector<int64_t> params;
};

std::vector<DtypeGroup> group_by_dtype(const std::vector<DtypeCode>& dtypes, const std::vector<int64_t>& numel) {
  std::vector<DtypeGroup> groups;
  for (int64_t p = 0; p < static_cast<int64_t>(dtypes.size()); ++p) {
    if (numel[p] == 0) continue;
    DtypeGroup* group = nullptr;
    for (auto& candidate : groups)
      if (candidate.dtype == dtypes[p]) group = &candidate;
    if (group == nullptr) {
      groups.push_back({dtypes[p], {}});
      group = &groups.back();
    }
    group->params.push_back(p);
  }
  return groups;
}

std::vector<int64_t> numels_of(const DtypeGroup& group, const std::vector<int64_t>& numel) {
  std::vector<int64_t> out;
  for (int64_t p : group.params) out.push_back(numel[p]);
  return out;
}

// Appends a [P_g, D] address table of `data(d, p)` for the group's parameters; returns its offset.
template <typename Data>
int64_t append_addresses(std::vector<int64_t>& host, const DtypeGroup& group, int64_t D, Data&& data) {
  const int64_t offset = static_cast<int64_t>(host.size());
  for (int64_t p : group.params)
    for (int64_t d = 0; d < D; ++d) host.push_back(address_of(data(d, p)));
  return offset;
}

// Appends the rows of the group (local tensor indices); returns (offset, row count).
std::pair<int64_t, int64_t> append_rows(std::vector<int64_t>& host, const std::vector<int64_t>& numels,
                                        const std::vector<int64_t>& tensor_index) {
  const int64_t offset = static_cast<int64_t>(host.size());
  const int64_t count = count_work_rows(numels, kRowElements);
  host.resize(offset + count * kWorkRowFields);
  fill_work_rows(numels, kRowElements, tensor_index, host.data() + offset);
  return {offset, count};
}

void check_gram_dim(int64_t D, const char* fn) {
  TORCH_CHECK_VALUE(D <= cuda::kMaxGramDim, fn, ": the CUDA kernels handle at most ", cuda::kMaxGramDim,
                    " gradients, got D = ", D);
}

}  // namespace

at::Tensor gram_forward_cuda(const WalkableGradients& grads) {
  const int64_t D = grads.num_grads;
  check_gram_dim(D, "gram_forward");
  const c10::cuda::CUDAGuard device_guard(grads.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  struct Launch {
    DtypeCode dtype;
    int64_t addresses, rows, num_rows, first_partial;
  };
  std::vector<int64_t> host;
  std::vector<Launch> launches;
  int64_t num_partials = 0;
  for (const DtypeGroup& group : group_by_dtype(grads.dtype, grads.numel)) {
    const int64_t addresses = append_addresses(host, group, D, [&](int64_t d, int64_t p) { return grads.data(d, p); });
    const auto [rows, num_rows] = append_rows(host, numels_of(group, grads.numel), {});
    launches.push_back({group.dtype, addresses, rows, num_rows, num_partials});
    num_partials += cuda::gram_forward_num_blocks(num_rows, static_cast<int>(D));
  }
  const at::Tensor table = upload_int64(host, grads.device);
  const int64_t* table_data = table.const_data_ptr<int64_t>();

  const auto double_options = at::TensorOptions().dtype(at::kDouble).device(grads.device);
  const int64_t pairs = cuda::gram_pair_count(static_cast<int>(D));
  at::Tensor partials = at::empty({std::max<int64_t>(1, num_partials) * pairs}, double_options);
  double* partial_data = partials.mutable_data_ptr<double>();
  for (const Launch& launch : launches) {
    C10_CUDA_CHECK(cuda::launch_gram_forward(table_data + launch.addresses, table_data + launch.rows, launch.num_rows,
                                             static_cast<int>(D), launch.dtype,
                                             partial_data + launch.first_partial * pairs, stream));
  }
  at::Tensor gram = at::empty({D, D}, double_options);
  C10_CUDA_CHECK(cuda::launch_gram_reduce(partial_data, num_partials, static_cast<int>(D),
                                          gram.mutable_data_ptr<double>(), stream));
  return grads.any_float64 ? gram : gram.to(at::kFloat);
}

GradientList gram_backward_cuda(const WalkableGradients& grads, const GradientList& original, const at::Tensor& S) {
  const int64_t D = grads.num_grads;
  const int64_t P = grads.num_tensors;
  check_gram_dim(D, "gram_backward");
  const c10::cuda::CUDAGuard device_guard(grads.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor S_device = S.to(grads.device, at::kDouble).contiguous();

  // Same output policy as the CPU path: the caller's layout, via scratch where it cannot be walked.
  GradientList outputs(D, std::vector<at::Tensor>(P));
  std::vector<at::Tensor> targets(D * P);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t d = 0; d < D; ++d) {
      outputs[d][p] = at::empty_like(original[d][p]);
      const at::Tensor& walked = grads.tensor(d, p);
      const bool direct = is_walkable(outputs[d][p]) && same_storage_order(outputs[d][p], walked);
      targets[d * P + p] = direct ? outputs[d][p] : at::empty_like(walked);
    }
  }

  struct Launch {
    DtypeCode dtype;
    int64_t in_addresses, out_addresses, rows, num_rows;
  };
  std::vector<int64_t> host;
  std::vector<Launch> launches;
  for (const DtypeGroup& group : group_by_dtype(grads.dtype, grads.numel)) {
    const int64_t in = append_addresses(host, group, D, [&](int64_t d, int64_t p) { return grads.data(d, p); });
    const int64_t out = append_addresses(host, group, D, [&](int64_t d, int64_t p) {
      return static_cast<const void*>(targets[d * P + p].mutable_data_ptr());
    });
    const auto [rows, num_rows] = append_rows(host, numels_of(group, grads.numel), {});
    launches.push_back({group.dtype, in, out, rows, num_rows});
  }
  const at::Tensor table = upload_int64(host, grads.device);
  const int64_t* table_data = table.const_data_ptr<int64_t>();
  for (const Launch& launch : launches) {
    C10_CUDA_CHECK(cuda::launch_gram_backward(table_data + launch.in_addresses, table_data + launch.out_addresses,
                                              table_data + launch.rows, launch.num_rows, static_cast<int>(D),
                                              launch.dtype, S_device.const_data_ptr<double>(), stream));
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = 0; d < D; ++d)
      if (!targets[d * P + p].is_same(outputs[d][p])) outputs[d][p].copy_(targets[d * P + p]);
  return outputs;
}

at::Tensor tensor_dots_cuda(const TensorPairs& pairs) {
  const int64_t P = pairs.num_tensors;
  const c10::cuda::CUDAGuard device_guard(pairs.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto double_options = at::TensorOptions().dtype(at::kDouble).device(pairs.device);

  // The row kernel reads a and b in one dtype: promote the narrower of a mixed pair.
  std::vector<at::Tensor> a = pairs.a, b = pairs.b;
  std::vector<DtypeCode> dtype(P);
  for (int64_t p = 0; p < P; ++p) {
    if (a[p].scalar_type() != b[p].scalar_type()) {
      const auto common = at::promote_types(a[p].scalar_type(), b[p].scalar_type());
      a[p] = a[p].to(common);  // keeps strides of dense tensors, so a and b still walk alike
      b[p] = b[p].to(common);
    }
    dtype[p] = dtype_code_of(a[p].scalar_type(), "tensor_dots", c10::str("a[", p, "]"));
  }

  // Layout: addresses [P, 2] | first_row [P] | row_count [P] | rows of each dtype group.
  std::vector<int64_t> host(4 * P, 0);
  for (int64_t p = 0; p < P; ++p) {
    host[2 * p] = address_of(a[p].const_data_ptr());
    host[2 * p + 1] = address_of(b[p].const_data_ptr());
  }
  struct Launch {
    DtypeCode dtype;
    int64_t rows, num_rows, first_row;
  };
  std::vector<Launch> launches;
  int64_t total_rows = 0;
  for (const DtypeGroup& group : group_by_dtype(dtype, pairs.numel)) {
    const std::vector<int64_t> numels = numels_of(group, pairs.numel);
    const auto [rows, num_rows] = append_rows(host, numels, group.params);  // rows carry the global p
    int64_t row = total_rows;
    for (size_t k = 0; k < group.params.size(); ++k) {
      host[2 * P + group.params[k]] = row;
      host[3 * P + group.params[k]] = (numels[k] + kRowElements - 1) / kRowElements;
      row += host[3 * P + group.params[k]];
    }
    launches.push_back({group.dtype, rows, num_rows, total_rows});
    total_rows += num_rows;
  }
  const at::Tensor table = upload_int64(host, pairs.device);
  const int64_t* table_data = table.const_data_ptr<int64_t>();

  at::Tensor row_dots = at::empty({std::max<int64_t>(1, total_rows)}, double_options);
  double* row_data = row_dots.mutable_data_ptr<double>();
  for (const Launch& launch : launches) {
    C10_CUDA_CHECK(cuda::launch_tensor_dot_rows(table_data, table_data + launch.rows, launch.num_rows, launch.dtype,
                                                row_data + launch.first_row, stream));
  }
  at::Tensor result = at::empty({P}, double_options);
  C10_CUDA_CHECK(cuda::launch_segment_sums(row_data, table_data + 2 * P, table_data + 3 * P, P,
                                           result.mutable_data_ptr<double>(), stream));
  return result;
}

}  // namespace nio_fast

#endif  // NIO_FAST_WITH_CUDA
