#include "gram_ops.h"

#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include "gram_cpu.h"
#ifdef NIO_FAST_WITH_CUDA
#include "cuda_ops.h"
#endif

namespace nio_fast {
namespace {

[[noreturn]] void unsupported_device(const char* fn, c10::Device device) {
  if (device.is_cuda()) {
    TORCH_CHECK(false, fn, ": grads are on ", device,
                " but nio_fast._C was built without CUDA support; reinstall with a CUDA toolkit "
                "(NIO_FAST_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation) or use the Triton kernels");
  }
  TORCH_CHECK(false, fn, ": grads on ", device, " are not supported (CPU and CUDA only)");
}

}  // namespace

at::Tensor gram_forward(const GradientList& grads) {
  constexpr const char* fn = "gram_forward";
  c10::NoGradGuard no_grad;
  const WalkableGradients walkable = prepare_gradients(grads, fn, NonWalkable::kCopy);
  if (walkable.device.is_cpu()) return gram_forward_cpu(walkable);
#ifdef NIO_FAST_WITH_CUDA
  if (walkable.device.is_cuda()) return gram_forward_cuda(walkable);
#endif
  unsupported_device(fn, walkable.device);
}

GradientList gram_backward(const GradientList& grads, const at::Tensor& S) {
  constexpr const char* fn = "gram_backward";
  c10::NoGradGuard no_grad;
  const WalkableGradients walkable = prepare_gradients(grads, fn, NonWalkable::kCopy);
  const int64_t D = walkable.num_grads;
  TORCH_CHECK_VALUE(S.defined() && S.dim() == 2 && S.size(0) == D && S.size(1) == D, fn, ": S must have shape [", D,
                    ", ", D, "] (D = len(grads)), got ", S.defined() ? c10::str(S.sizes()) : "undefined");
  TORCH_CHECK_TYPE(at::isFloatingType(S.scalar_type()), fn, ": S has dtype ", dtype_name(S.scalar_type()),
                   "; expected a floating dtype");
  TORCH_CHECK(S.device().is_cpu() || S.device() == walkable.device, fn, ": S is on ", S.device(),
              " but grads are on ", walkable.device, "; S must be on the CPU or the grads' device");
  if (walkable.device.is_cpu()) return gram_backward_cpu(walkable, grads, S);
#ifdef NIO_FAST_WITH_CUDA
  if (walkable.device.is_cuda()) return gram_backward_cuda(walkable, grads, S);
#endif
  unsupported_device(fn, walkable.device);
}

}  // namespace nio_fast
