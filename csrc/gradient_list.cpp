#include "gradient_list.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace nio_fast {

int64_t WalkableGradients::total_numel() const {
  int64_t total = 0;
  for (int64_t n : numel) total += n;
  return total;
}

bool is_walkable(const at::Tensor& t) { return t.numel() == 0 || t.is_non_overlapping_and_dense(); }

bool same_storage_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t dim = 0; dim < a.dim(); ++dim) {
    if (a.size(dim) > 1 && a.stride(dim) != b.stride(dim)) return false;
  }
  return true;
}

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
  }
}

DtypeCode dtype_code_of(at::ScalarType type, const char* fn, const std::string& what) {
  switch (type) {
    case at::kHalf: return DtypeCode::kFloat16;
    case at::kBFloat16: return DtypeCode::kBFloat16;
    case at::kFloat: return DtypeCode::kFloat32;
    case at::kDouble: return DtypeCode::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, fn, ": ", what, " has dtype ", dtype_name(type),
                       "; expected torch.float16, torch.bfloat16, torch.float32 or torch.float64");
  }
}

namespace {

std::string name_of(int64_t d, int64_t p) { return c10::str("grads[", d, "][", p, "]"); }

}  // namespace

WalkableGradients prepare_gradients(const GradientList& grads, const char* fn, NonWalkable policy) {
  WalkableGradients out;
  out.num_grads = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(out.num_grads >= 1, fn, ": grads must hold at least one gradient (a list of D >= 1 lists of tensors)");
  out.num_tensors = static_cast<int64_t>(grads[0].size());
  const int64_t D = out.num_grads;
  const int64_t P = out.num_tensors;
  for (int64_t d = 1; d < D; ++d) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(grads[d].size()) == P, fn, ": grads[", d, "] has ", grads[d].size(),
                      " tensors but grads[0] has ", P, "; every gradient must list the same parameters");
  }
  if (P > 0) out.device = grads[0][0].device();

  out.tensors.resize(D * P);
  out.numel.resize(P);
  out.dtype.resize(P);
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& first = grads[0][p];
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor& t = grads[d][p];
      TORCH_CHECK_VALUE(t.defined(), fn, ": ", name_of(d, p), " is undefined");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, fn, ": ", name_of(d, p), " has layout ", t.layout(),
                        "; only dense (strided) tensors are supported");
      TORCH_CHECK(t.device() == out.device, fn, ": ", name_of(d, p), " is on ", t.device(), " but ", name_of(0, 0),
                  " is on ", out.device, "; all gradients must be on one device");
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), fn, ": ", name_of(d, p), " has dtype ",
                       dtype_name(t.scalar_type()), " but ", name_of(0, p), " has dtype ",
                       dtype_name(first.scalar_type()), "; one parameter must have one dtype across gradients");
      TORCH_CHECK_VALUE(t.sizes() == first.sizes(), fn, ": ", name_of(d, p), " has shape ", t.sizes(), " but ",
                        name_of(0, p), " has shape ", first.sizes(), "; one parameter must have one shape across gradients");
    }
    out.dtype[p] = dtype_code_of(first.scalar_type(), fn, name_of(0, p));
    out.any_float64 = out.any_float64 || out.dtype[p] == DtypeCode::kFloat64;
    out.numel[p] = first.numel();

    // Lazily negated views carry their sign in a flag the kernels would miss.
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor& t = grads[d][p];
      out.tensors[d * P + p] = t.is_neg() ? t.resolve_neg() : t;
    }
    bool walkable = true;
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor& t = out.tensors[d * P + p];
      walkable = walkable && is_walkable(t) && same_storage_order(t, out.tensors[p]);
    }
    if (walkable || out.numel[p] == 0) continue;
    TORCH_CHECK_VALUE(policy == NonWalkable::kCopy, fn, ": ", name_of(0, p), " (shape ", first.sizes(), ", strides ",
                      first.strides(),
                      ") cannot be walked in storage order: every grads[d][", p,
                      "] must be dense and non-overlapping with identical strides; make them contiguous first");
    for (int64_t d = 0; d < D; ++d) out.tensors[d * P + p] = out.tensors[d * P + p].contiguous();
  }
  // Read once here: kernels run in worker threads and must not call into ATen.
  out.first_element.resize(D * P);
  for (int64_t i = 0; i < D * P; ++i) out.first_element[i] = out.tensors[i].const_data_ptr();
  return out;
}

}  // namespace nio_fast
