// CPU implementations of the Gram matrix and its backward over walkable gradients.
#pragma once

#include <vector>

#include <ATen/ATen.h>

#include "gradient_list.h"

namespace nio_fast {

// G[i, j] = sum_p <grads[i][p], grads[j][p]>; float64 if any input is float64, else float32.
at::Tensor gram_forward_cpu(const WalkableGradients& grads);

// out[d][p] = sum_j S[d, j] * grads[j][p], allocated like original[d][p].
GradientList gram_backward_cpu(const WalkableGradients& grads, const GradientList& original, const at::Tensor& S);

}  // namespace nio_fast
