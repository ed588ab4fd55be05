// Python module nio_fast._C: argument conversion and the GIL only; the work
// is in gram_ops.cpp, tensor_dots.cpp, work_table.cpp, chunk_reduce.cpp,
// group_norm.cpp, batch_norm.cpp, layer_norm.cpp, attention.cpp and
// cpu_allocation_cache.cpp.
#include <torch/extension.h>

#include "attention.h"
#include "batch_norm.h"
#include "chunk_reduce.h"
#include "cpu_allocation_cache.h"
#include "cpu_kernels.h"
#include "gram_ops.h"
#include "group_norm.h"
#include "layer_norm.h"
#include "tensor_dots.h"
#include "work_table.h"

namespace {

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

bool cuda_compiled() {
#ifdef NIO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using nio_fast::GradientList;
  m.doc() = "nio_fast C++/CUDA kernels: Gram matrices of gradient lists without concatenation.";

  m.def("gram_forward", &nio_fast::gram_forward, py::arg("grads"), py::call_guard<py::gil_scoped_release>(),
        "G[i, j] = sum_p <grads[i][p], grads[j][p]> for grads[d][p] (D lists of P tensors). "
        "float32 result (fp32 accumulation), float64 if any input is float64.");
  m.def("gram_backward", &nio_fast::gram_backward, py::arg("grads"), py::arg("S"),
        py::call_guard<py::gil_scoped_release>(),
        "out[d][p] = sum_j S[d, j] * grads[j][p], each out[d][p] shaped, typed and strided like grads[d][p].");
  m.def("build_work_table", &nio_fast::build_work_table, py::arg("grads"), py::arg("block"),
        py::call_guard<py::gil_scoped_release>(),
        "(addresses int64 [P, D], rows int64 [R, 3] = (tensor, first element, count)) on the grads' device, "
        "for one dtype group of walkable tensors.");
  m.def("tensor_dots", &nio_fast::tensor_dots, py::arg("a"), py::arg("b"), py::call_guard<py::gil_scoped_release>(),
        "float64 [P] tensor of <a[p], b[p]> on the inputs' device.");
  m.def("chunk_sandwich", &nio_fast::chunk_sandwich, py::arg("matrix"), py::arg("offsets"), py::arg("indices"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>(),
        "out[r, s] = sum over row r's entries a and row s's entries b of weights[a] * weights[b] * "
        "matrix[indices[a], indices[b]] (W M W^T for CSR rows of W).");
  m.def("chunk_row_sums", &nio_fast::chunk_row_sums, py::arg("values"), py::arg("offsets"), py::arg("indices"),
        py::arg("weights"), py::call_guard<py::gil_scoped_release>(),
        "out[r, :] = sum over row r's entries a of weights[a] * values[indices[a], :] (W V for CSR rows of W).");
  m.def(
      "group_norm_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const std::optional<at::Tensor>& weight, int64_t groups) {
        return nio_fast::group_norm_backward(grad_out, x, mean, rstd, or_undefined(weight), groups);
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("groups"),
      py::call_guard<py::gil_scoped_release>(),
      "GroupNorm backward, CPU: (grad_x, grad_weight per sample [N, C], grad_bias per sample [N, C]).");
  m.def(
      "group_norm_double_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const std::optional<at::Tensor>& weight, int64_t groups, const std::optional<at::Tensor>& u,
         const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& q) {
        return nio_fast::group_norm_double_backward(grad_out, x, mean, rstd, or_undefined(weight), groups,
                                                    or_undefined(u), or_undefined(p), or_undefined(q));
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("groups"),
      py::arg("u"), py::arg("p"), py::arg("q"), py::call_guard<py::gil_scoped_release>(),
      "VJP of group_norm_backward with cotangents (u, p, q), CPU: (d grad_out, d x, d weight per sample [N, C]).");
  m.def(
      "batch_norm_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const std::optional<at::Tensor>& weight) {
        return nio_fast::batch_norm_backward(grad_out, x, mean, rstd, or_undefined(weight));
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
      py::call_guard<py::gil_scoped_release>(),
      "BatchNorm backward with batch statistics, CPU: (grad_x, grad_weight [C], grad_bias [C]).");
  m.def(
      "batch_norm_double_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& u,
         const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& q) {
        return nio_fast::batch_norm_double_backward(grad_out, x, mean, rstd, or_undefined(weight), or_undefined(u),
                                                    or_undefined(p), or_undefined(q));
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("u"),
      py::arg("p"), py::arg("q"), py::call_guard<py::gil_scoped_release>(),
      "VJP of BatchNorm's backward with cotangents (u, p, q), CPU: (d grad_out, d x, d weight [C]).");
  m.def(
      "batch_norm_double_backward_from_grad_x",
      [](const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& x,
         const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& q) {
        return nio_fast::batch_norm_double_backward_from_grad_x(grad_x, grad_weight, grad_bias, x, mean, rstd,
                                                                or_undefined(weight), or_undefined(u),
                                                                or_undefined(p), or_undefined(q));
      },
      py::arg("grad_x"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("x"), py::arg("mean"),
      py::arg("rstd"), py::arg("weight"), py::arg("u"), py::arg("p"), py::arg("q"),
      py::call_guard<py::gil_scoped_release>(),
      "batch_norm_double_backward with grad_out rebuilt from the backward's outputs (weight without zeros).");
  m.def(
      "batch_norm_grad_out_rebuildable",
      [](const std::optional<at::Tensor>& weight) { return nio_fast::grad_out_rebuildable(or_undefined(weight)); },
      py::arg("weight"), "Whether batch_norm_double_backward_from_grad_x can rebuild grad_out (CPU read).");
  m.def(
      "layer_norm_double_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& u,
         const std::optional<at::Tensor>& p, const std::optional<at::Tensor>& q) {
        return nio_fast::layer_norm_double_backward(grad_out, x, mean, rstd, or_undefined(weight), or_undefined(u),
                                                    or_undefined(p), or_undefined(q));
      },
      py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("u"),
      py::arg("p"), py::arg("q"), py::call_guard<py::gil_scoped_release>(),
      "VJP of LayerNorm's backward on [R, E] rows with cotangents (u, p, q), CPU: (d grad_out, d x, d weight [E]).");
  m.def(
      "attention_softmax_double_backward_",
      [](const at::Tensor& probabilities, at::Tensor grad_p, at::Tensor cot_grad_scores, at::Tensor cot_p,
         double scale) {
        nio_fast::attention_softmax_double_backward_(probabilities, grad_p, cot_grad_scores, cot_p, scale);
      },
      py::arg("probabilities"), py::arg("grad_p"), py::arg("cot_grad_scores"), py::arg("cot_p"), py::arg("scale"),
      py::call_guard<py::gil_scoped_release>(),
      "Attention's softmax double backward in place, CPU: grad_p <- dS, cot_grad_scores (H / scale) <- GdP, "
      "cot_p <- GS (nio_fast/ops/attention.py).");
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in.");
  m.def("cpu_cache_enter", &nio_fast::cpu_cache_enter,
        "Enter a span in which freed CPU tensor blocks of 16 KB or more are kept and reused (spans nest); "
        "False, and nothing done, when a CPU allocator other than PyTorch's default is installed.");
  m.def("cpu_cache_exit", &nio_fast::cpu_cache_exit, "Leave a span; leaving the outermost frees every kept block.");
  m.def("cpu_cache_stats", &nio_fast::cpu_cache_stats,
        "[depth, kept bytes, bytes handed out now, most handed out at once in the span, reuses, fresh allocations].");

  // For tests and benchmarks: which CPU kernel variant runs ("baseline" / "avx2").
  m.def("_cpu_kernel_variant", []() { return std::string(nio_fast::cpu::active_kernels().name); });
  m.def(
      "_set_cpu_kernel_variant",
      [](const std::string& name) {
        TORCH_CHECK_VALUE(nio_fast::cpu::set_kernel_variant(name.c_str()), "_set_cpu_kernel_variant: '", name,
                          "' is not available here (choose 'auto', 'baseline' or, on AVX2 CPUs, 'avx2')");
      },
      py::arg("name"));
}
