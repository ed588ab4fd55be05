// Work split (both directions): the P tensors are viewed as one virtual
// concatenation of N elements per gradient. The forward pass cuts it into
// equal "groups" whose count depends only on N and D (never on the thread
// count), computes one partial Gram per group and sums the partials in group
// order, so results are bit-identical for any number of threads and one huge
// tensor among tiny ones still spreads over all threads.
#include "gram_cpu.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_kernels.h"

namespace nio_fast {
namespace {

// fp32 lane accumulators are folded into double at least this often, so each
// lane sums at most 4096 / 8 products.
constexpr int64_t kFlushElements = 4096;
// Forward: elements per row per kernel call. Long rows amortise each register
// tile's set-up and keep the prefetcher streaming; measured (AVX2, one core,
// D = 64, data not in cache): 13.7 GFMA/s at 512, 20.0 at 2048, 21.7 at 4096.
constexpr int64_t kForwardChunkElements = kFlushElements;
// Backward: every output tile re-reads all D input rows of the chunk, so
// D x chunk floats should fit L1 (32 KiB). Measured (AVX2, D = 64): 11.0 GFMA/s
// at 128 elements, 7.9 at 256, 7.6 at 512; D = 16: 9.6 at 512 (flat 256-1024).
constexpr int64_t kBackwardChunkBytes = 32 * 1024;
// Enough elements per group to amortise its partial Gram, few enough groups
// (for D = 4 up to 1024) to balance any realistic thread count.
constexpr int64_t kMinGroupElements = 16384;
constexpr int64_t kMaxGroups = 1024;
constexpr int64_t kPartialBudgetBytes = 8 * 1024 * 1024;
// Backward has no reduction; at::parallel_for splits elements evenly.
constexpr int64_t kBackwardGrainElements = 32768;

int64_t backward_chunk_elements(int64_t D) {
  const int64_t chunk = kBackwardChunkBytes / (4 * D) / 16 * 16;
  return std::max<int64_t>(128, std::min<int64_t>(4096, chunk));
}

int64_t group_count(int64_t total, int64_t D) {
  const int64_t by_size = (total + kMinGroupElements - 1) / kMinGroupElements;
  const int64_t by_memory = std::max<int64_t>(1, kPartialBudgetBytes / (D * D * int64_t(sizeof(double))));
  return std::max<int64_t>(1, std::min({by_size, kMaxGroups, by_memory}));
}

// Start offset of every tensor in the virtual concatenation, plus the total.
std::vector<int64_t> segment_starts(const WalkableGradients& grads) {
  std::vector<int64_t> starts(grads.num_tensors + 1, 0);
  for (int64_t p = 0; p < grads.num_tensors; ++p) starts[p + 1] = starts[p] + grads.numel[p];
  return starts;
}

// Calls visit(p, first, count) for the pieces of [begin, end) in tensor order,
// each piece at most `chunk` elements of one tensor.
template <typename Visit>
void for_each_chunk(const std::vector<int64_t>& starts, int64_t begin, int64_t end, int64_t chunk, Visit&& visit) {
  int64_t p = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  int64_t pos = begin;
  while (pos < end) {
    while (starts[p + 1] <= pos) ++p;  // skips finished and empty tensors
    const int64_t local_end = std::min(end, starts[p + 1]) - starts[p];
    for (int64_t first = pos - starts[p]; first < local_end; first += chunk) {
      visit(p, first, std::min(chunk, local_end - first));
    }
    pos = starts[p] + local_end;
  }
}

// Converts n half / bfloat16 elements starting at element `first` into floats.
void to_float(const cpu::KernelTable& k, DtypeCode dtype, const void* data, int64_t first, int64_t n, float* dst) {
  const uint16_t* src = static_cast<const uint16_t*>(data) + first;
  if (dtype == DtypeCode::kFloat16) {
    k.half_to_float(src, dst, n);
  } else {
    k.bfloat16_to_float(src, dst, n);
  }
}

void from_float(const cpu::KernelTable& k, DtypeCode dtype, const float* src, int64_t n, void* data, int64_t first) {
  uint16_t* dst = static_cast<uint16_t*>(data) + first;
  if (dtype == DtypeCode::kFloat16) {
    k.float_to_half(src, dst, n);
  } else {
    k.float_to_bfloat16(src, dst, n);
  }
}

// Per-thread buffers for accumulating one group after another.
class GramAccumulator {
 public:
  GramAccumulator(const cpu::KernelTable& kernels, int64_t D, int64_t chunk)
      : k_(kernels),
        D_(static_cast<int>(D)),
        chunk_(chunk),
        acc32_(k_.gram_acc_size_f32(D_), 0.0f),
        acc64_(k_.gram_acc_size_f64(D_), 0.0),
        staging_(D * chunk),
        rows32_(D),
        rows64_(D) {}

  void add_chunk(const WalkableGradients& grads, int64_t p, int64_t first, int64_t n, double* gram) {
    const DtypeCode dtype = grads.dtype[p];
    if (dtype == DtypeCode::kFloat64) {
      for (int d = 0; d < D_; ++d) rows64_[d] = static_cast<const double*>(grads.data(d, p)) + first;
      k_.gram_accumulate_f64(rows64_.data(), D_, n, acc64_.data());
      pending64_ += n;
      if (pending64_ >= kFlushElements) flush64(gram);
      return;
    }
    for (int d = 0; d < D_; ++d) {
      if (dtype == DtypeCode::kFloat32) {
        rows32_[d] = static_cast<const float*>(grads.data(d, p)) + first;
      } else {
        float* stage = staging_.data() + d * chunk_;
        to_float(k_, dtype, grads.data(d, p), first, n, stage);
        rows32_[d] = stage;
      }
    }
    k_.gram_accumulate_f32(rows32_.data(), D_, n, acc32_.data());
    pending32_ += n;
    if (pending32_ >= kFlushElements) flush32(gram);
  }

  void finish(double* gram) {
    if (pending32_ > 0) flush32(gram);
    if (pending64_ > 0) flush64(gram);
  }

 private:
  void flush32(double* gram) {
    k_.gram_flush_f32(acc32_.data(), D_, gram);
    pending32_ = 0;
  }
  void flush64(double* gram) {
    k_.gram_flush_f64(acc64_.data(), D_, gram);
    pending64_ = 0;
  }

  const cpu::KernelTable& k_;
  const int D_;
  const int64_t chunk_;
  std::vector<float> acc32_;
  std::vector<double> acc64_;
  std::vector<float> staging_;
  std::vector<const float*> rows32_;
  std::vector<const double*> rows64_;
  int64_t pending32_ = 0;
  int64_t pending64_ = 0;
};

}  // namespace

at::Tensor gram_forward_cpu(const WalkableGradients& grads) {
  const int64_t D = grads.num_grads;
  const auto result_dtype = grads.any_float64 ? at::kDouble : at::kFloat;
  const std::vector<int64_t> starts = segment_starts(grads);
  const int64_t total = starts.back();
  const cpu::KernelTable& kernels = cpu::active_kernels();

  const int64_t groups = group_count(total, D);
  const int64_t group_size = (total + groups - 1) / groups;
  const int64_t chunk = kForwardChunkElements;
  std::vector<double> partials(total > 0 ? groups * D * D : 0, 0.0);
  if (total > 0) {
    at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
      GramAccumulator accumulator(kernels, D, chunk);
      for (int64_t g = group_begin; g < group_end; ++g) {
        double* gram = partials.data() + g * D * D;
        const int64_t begin = g * group_size;
        const int64_t end = std::min(total, begin + group_size);
        for_each_chunk(starts, begin, end, chunk, [&](int64_t p, int64_t first, int64_t n) {
          accumulator.add_chunk(grads, p, first, n, gram);
        });
        accumulator.finish(gram);
      }
    });
  }

  at::Tensor result = at::zeros({D, D}, at::TensorOptions().dtype(at::kDouble));
  double* out = result.mutable_data_ptr<double>();
  for (size_t g = 0; g * D * D < partials.size(); ++g) {
    const double* gram = partials.data() + g * D * D;
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = i; j < D; ++j) out[i * D + j] += gram[i * D + j];
  }
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < i; ++j) out[i * D + j] = out[j * D + i];
  return result_dtype == at::kDouble ? result : result.to(result_dtype);
}

GradientList gram_backward_cpu(const WalkableGradients& grads, const GradientList& original, const at::Tensor& S) {
  const int64_t D = grads.num_grads;
  const int64_t P = grads.num_tensors;
  const at::Tensor S64 = S.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor S32 = S64.to(at::kFloat);
  const double* s64 = S64.const_data_ptr<double>();
  const float* s32 = S32.const_data_ptr<float>();

  // Outputs keep the caller's layout; where that layout cannot be written in
  // the walk order of the inputs, compute into a scratch tensor and copy.
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

  const std::vector<int64_t> starts = segment_starts(grads);
  const int64_t total = starts.back();
  const cpu::KernelTable& kernels = cpu::active_kernels();
  std::vector<void*> target_data(D * P);
  for (int64_t i = 0; i < D * P; ++i) target_data[i] = targets[i].mutable_data_ptr();

  const int64_t chunk = backward_chunk_elements(D);
  at::parallel_for(0, total, kBackwardGrainElements, [&](int64_t begin, int64_t end) {
    std::vector<float> stage_in(D * chunk), stage_out(D * chunk);
    std::vector<const float*> in32(D);
    std::vector<float*> out32(D);
    std::vector<const double*> in64(D);
    std::vector<double*> out64(D);
    for_each_chunk(starts, begin, end, chunk, [&](int64_t p, int64_t first, int64_t n) {
      const DtypeCode dtype = grads.dtype[p];
      auto target = [&](int64_t d) { return target_data[d * P + p]; };
      if (dtype == DtypeCode::kFloat64) {
        for (int64_t d = 0; d < D; ++d) {
          in64[d] = static_cast<const double*>(grads.data(d, p)) + first;
          out64[d] = static_cast<double*>(target(d)) + first;
        }
        kernels.combine_f64(in64.data(), static_cast<int>(D), n, s64, out64.data());
      } else if (dtype == DtypeCode::kFloat32) {
        for (int64_t d = 0; d < D; ++d) {
          in32[d] = static_cast<const float*>(grads.data(d, p)) + first;
          out32[d] = static_cast<float*>(target(d)) + first;
        }
        kernels.combine_f32(in32.data(), static_cast<int>(D), n, s32, out32.data());
      } else {
        for (int64_t d = 0; d < D; ++d) {
          to_float(kernels, dtype, grads.data(d, p), first, n, stage_in.data() + d * chunk);
          in32[d] = stage_in.data() + d * chunk;
          out32[d] = stage_out.data() + d * chunk;
        }
        kernels.combine_f32(in32.data(), static_cast<int>(D), n, s32, out32.data());
        for (int64_t d = 0; d < D; ++d) from_float(kernels, dtype, out32[d], n, target(d), first);
      }
    });
  });

  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = 0; d < D; ++d)
      if (!targets[d * P + p].is_same(outputs[d][p])) outputs[d][p].copy_(targets[d * P + p]);
  return outputs;
}

}  // namespace nio_fast
