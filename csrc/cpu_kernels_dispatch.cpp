// Picks the CPU kernel variant once, from what the processor supports.
#include <atomic>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "cpu_kernels.h"

namespace nio_fast {
namespace cpu {

void half_to_float_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(c10::Half(src[k], c10::Half::from_bits()));
}

void float_to_half_portable(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = c10::Half(src[k]).x;
}

namespace {

bool cpu_has_avx2() {
#if defined(NIO_FAST_HAVE_AVX2_VARIANT)
  // __builtin_cpu_supports also checks that the OS saves the YMM registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable& baseline_table() {
  static const KernelTable table = make_baseline_kernels();
  return table;
}

const KernelTable* avx2_table() {
#if defined(NIO_FAST_HAVE_AVX2_VARIANT)
  static const KernelTable table = make_avx2_kernels();
  return cpu_has_avx2() ? &table : nullptr;
#else
  return nullptr;
#endif
}

const KernelTable* best_table() {
  const KernelTable* avx2 = avx2_table();
  return avx2 != nullptr ? avx2 : &baseline_table();
}

std::atomic<const KernelTable*>& active_table() {
  static std::atomic<const KernelTable*> table{best_table()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *active_table().load(std::memory_order_acquire); }

bool set_kernel_variant(const char* name) {
  const KernelTable* chosen = nullptr;
  if (std::strcmp(name, "auto") == 0) {
    chosen = best_table();
  } else if (std::strcmp(name, "baseline") == 0) {
    chosen = &baseline_table();
  } else if (std::strcmp(name, "avx2") == 0) {
    chosen = avx2_table();
  }
  if (chosen == nullptr) return false;
  active_table().store(chosen, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace nio_fast
