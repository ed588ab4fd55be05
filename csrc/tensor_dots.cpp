// CPU side: tensors are cut into fixed chunks (independent of the thread
// count), chunk dots run in parallel and are summed per tensor in chunk
// order, so results are deterministic and a huge tensor uses every thread.
#include "tensor_dots.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include "cpu_kernels.h"
#include "gradient_list.h"
#ifdef NIO_FAST_WITH_CUDA
#include "cuda_ops.h"
#endif

namespace nio_fast {
namespace {

constexpr const char* kFn = "tensor_dots";
// Work unit of the parallel loop.
constexpr int64_t kChunkElements = 16384;
// fp32 partial dots are folded into double after at most this many elements;
// also the size of the conversion buffers.
constexpr int64_t kBlockElements = 4096;

struct Chunk {
  int64_t p, first, count;
};

// Staging buffers of one worker thread.
struct DotScratch {
  std::vector<float> a32 = std::vector<float>(kBlockElements), b32 = std::vector<float>(kBlockElements);
  std::vector<double> a64 = std::vector<double>(kBlockElements), b64 = std::vector<double>(kBlockElements);
};

const float* as_float(const cpu::KernelTable& k, DtypeCode dtype, const void* data, int64_t first, int64_t n,
                      float* stage) {
  switch (dtype) {
    case DtypeCode::kFloat32: return static_cast<const float*>(data) + first;
    case DtypeCode::kFloat16: k.half_to_float(static_cast<const uint16_t*>(data) + first, stage, n); return stage;
    case DtypeCode::kBFloat16: k.bfloat16_to_float(static_cast<const uint16_t*>(data) + first, stage, n); return stage;
    default: TORCH_INTERNAL_ASSERT(false, "as_float: unexpected dtype");
  }
}

const double* as_double(const cpu::KernelTable& k, DtypeCode dtype, const void* data, int64_t first, int64_t n,
                        float* float_stage, double* stage) {
  if (dtype == DtypeCode::kFloat64) return static_cast<const double*>(data) + first;
  const float* values = as_float(k, dtype, data, first, n, float_stage);
  for (int64_t i = 0; i < n; ++i) stage[i] = values[i];
  return stage;
}

double chunk_dot(const cpu::KernelTable& k, const TensorPairs& pairs, const Chunk& chunk, DotScratch& s) {
  const int64_t p = chunk.p;
  const bool wide = pairs.a_dtype[p] == DtypeCode::kFloat64 || pairs.b_dtype[p] == DtypeCode::kFloat64;
  double sum = 0.0;
  for (int64_t first = chunk.first; first < chunk.first + chunk.count; first += kBlockElements) {
    const int64_t n = std::min(kBlockElements, chunk.first + chunk.count - first);
    if (wide) {
      const double* a = as_double(k, pairs.a_dtype[p], pairs.a_data[p], first, n, s.a32.data(), s.a64.data());
      const double* b = as_double(k, pairs.b_dtype[p], pairs.b_data[p], first, n, s.b32.data(), s.b64.data());
      sum += k.dot_f64(a, b, n);
    } else {
      const float* a = as_float(k, pairs.a_dtype[p], pairs.a_data[p], first, n, s.a32.data());
      const float* b = as_float(k, pairs.b_dtype[p], pairs.b_data[p], first, n, s.b32.data());
      sum += k.dot_f32(a, b, n);
    }
  }
  return sum;
}

}  // namespace

TensorPairs prepare_tensor_pairs(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  TORCH_CHECK_VALUE(a.size() == b.size(), kFn, ": a has ", a.size(), " tensors but b has ", b.size());
  TensorPairs pairs;
  const int64_t P = static_cast<int64_t>(a.size());
  pairs.num_tensors = P;
  if (P > 0) pairs.device = a[0].device();
  for (int64_t p = 0; p < P; ++p) {
    for (const auto& [t, name] : {std::make_pair(&a[p], "a"), std::make_pair(&b[p], "b")}) {
      TORCH_CHECK_VALUE(t->defined(), kFn, ": ", name, "[", p, "] is undefined");
      TORCH_CHECK_VALUE(t->layout() == at::kStrided, kFn, ": ", name, "[", p, "] has layout ", t->layout(),
                        "; only dense (strided) tensors are supported");
      TORCH_CHECK(t->device() == pairs.device, kFn, ": ", name, "[", p, "] is on ", t->device(), " but a[0] is on ",
                  pairs.device, "; all tensors must be on one device");
    }
    TORCH_CHECK_VALUE(a[p].sizes() == b[p].sizes(), kFn, ": a[", p, "] has shape ", a[p].sizes(), " but b[", p,
                      "] has shape ", b[p].sizes());
    pairs.a_dtype.push_back(dtype_code_of(a[p].scalar_type(), kFn, c10::str("a[", p, "]")));
    pairs.b_dtype.push_back(dtype_code_of(b[p].scalar_type(), kFn, c10::str("b[", p, "]")));
    pairs.numel.push_back(a[p].numel());

    at::Tensor ap = a[p].is_neg() ? a[p].resolve_neg() : a[p];
    at::Tensor bp = b[p].is_neg() ? b[p].resolve_neg() : b[p];
    if (ap.numel() > 0 && !(is_walkable(ap) && is_walkable(bp) && same_storage_order(ap, bp))) {
      ap = ap.contiguous();
      bp = bp.contiguous();
    }
    pairs.a.push_back(ap);
    pairs.b.push_back(bp);
    pairs.a_data.push_back(ap.const_data_ptr());
    pairs.b_data.push_back(bp.const_data_ptr());
  }
  return pairs;
}

at::Tensor tensor_dots_cpu(const TensorPairs& pairs) {
  std::vector<Chunk> chunks;
  for (int64_t p = 0; p < pairs.num_tensors; ++p)
    for (int64_t first = 0; first < pairs.numel[p]; first += kChunkElements)
      chunks.push_back({p, first, std::min(kChunkElements, pairs.numel[p] - first)});

  const cpu::KernelTable& kernels = cpu::active_kernels();
  std::vector<double> chunk_sums(chunks.size());
  const int64_t grain = 4;  // chunks; ~64K elements before another thread is woken
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t begin, int64_t end) {
    DotScratch scratch;
    for (int64_t c = begin; c < end; ++c) chunk_sums[c] = chunk_dot(kernels, pairs, chunks[c], scratch);
  });

  at::Tensor result = at::zeros({pairs.num_tensors}, at::TensorOptions().dtype(at::kDouble));
  double* out = result.mutable_data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].p] += chunk_sums[c];
  return result;
}

at::Tensor tensor_dots(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  c10::NoGradGuard no_grad;
  const TensorPairs pairs = prepare_tensor_pairs(a, b);
  if (pairs.device.is_cpu()) return tensor_dots_cpu(pairs);
  if (pairs.device.is_cuda()) {
#ifdef NIO_FAST_WITH_CUDA
    return tensor_dots_cuda(pairs);
#else
    TORCH_CHECK(false, kFn, ": the tensors are on ", pairs.device,
                " but nio_fast._C was built without CUDA support; reinstall with a CUDA toolkit "
                "(NIO_FAST_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation)");
#endif
  }
  TORCH_CHECK(false, kFn, ": tensors on ", pairs.device, " are not supported (CPU and CUDA only)");
}

}  // namespace nio_fast
