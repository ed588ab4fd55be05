// Element types the kernels understand, shared by the C++ and the plain-CUDA
// sources (no PyTorch headers here, so nvcc can compile the .cu files alone).
#pragma once

#include <cstdint>

namespace nio_fast {

enum class DtypeCode : int32_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
};

}  // namespace nio_fast
