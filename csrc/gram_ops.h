// gram_forward / gram_backward entry points: validation and device dispatch.
#pragma once

#include <ATen/ATen.h>

#include "gradient_list.h"

namespace nio_fast {

at::Tensor gram_forward(const GradientList& grads);
GradientList gram_backward(const GradientList& grads, const at::Tensor& S);

}  // namespace nio_fast
