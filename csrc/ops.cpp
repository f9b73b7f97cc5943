// The op schemas (the one place they are written) and the Python module `cnnkernels._C`,
// which carries the build information and direct entry points to the ops. Kernels register
// themselves per device in csrc/cpu/ and csrc/cuda/ with TORCH_LIBRARY_IMPL, their autograd in
// csrc/autograd.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/conv2d_relu.h"
#include "cpu/winograd.h"
#ifdef CNNKERNELS_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

#ifndef CNNKERNELS_TORCH_VERSION
#define CNNKERNELS_TORCH_VERSION "unknown"
#endif
#ifndef CNNKERNELS_CUDA_VERSION
#define CNNKERNELS_CUDA_VERSION ""
#endif
#ifndef CNNKERNELS_CUDA_ARCHS
#define CNNKERNELS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(cnnkernels, m) {
  m.def("conv2d_relu(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_add_relu(Tensor input, Tensor weight, Tensor residual, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("add_relu(Tensor input, Tensor other) -> Tensor");
  // The backward of the ReLU at the end of every op, in one pass: grad_pre_relu is grad where
  // output > 0 or NaN (aten.threshold_backward's rule), 0 elsewhere, in output's memory format;
  // grad_bias[c] sums grad_pre_relu over N, H, W in a fixed order (deterministic).
  m.def("relu_backward_bias_grad(Tensor grad, Tensor output) -> (Tensor grad_pre_relu, Tensor grad_bias)");
}

namespace {

// Each op through the dispatcher, as torch.ops.cnnkernels.<op> calls it (autograd, autocast,
// dispatch modes, the profiler), minus torch.ops' Python argument matching: 10-25 us less per
// conv call and 1-2 us less per add_relu on the CPU dev box (benchmarks/results/
// 2026-12-05_CPU-AMD-EPYC-2-threads_host-overhead-session3.txt). It does not see
// __torch_function__ or torch.compile, so cnnkernels/backends.py calls it only for plain eager
// work. Errors reach Python as the dispatcher's do (NotImplementedError, ValueError, ...).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

template <typename Signature, typename... Args>
at::Tensor call(const c10::TypedOperatorHandle<Signature>& op, const Args&... args) {
  HANDLE_TH_ERRORS
  pybind11::gil_scoped_release no_gil;
  return op.call(args...);
  END_HANDLE_TH_ERRORS_PYBIND
}

using IntList = std::vector<int64_t>;
using OptionalTensor = c10::optional<at::Tensor>;

at::Tensor conv2d_relu(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
                       const IntList& stride, const IntList& padding, const IntList& dilation, int64_t groups) {
  static const auto op =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, at::IntArrayRef,
                          at::IntArrayRef, at::IntArrayRef, int64_t)>("cnnkernels::conv2d_relu");
  return call(op, input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d_add_relu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                           const OptionalTensor& bias, const IntList& stride, const IntList& padding,
                           const IntList& dilation, int64_t groups) {
  static const auto op =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>("cnnkernels::conv2d_add_relu");
  return call(op, input, weight, residual, bias, stride, padding, dilation, groups);
}

at::Tensor add_relu(const at::Tensor& input, const at::Tensor& other) {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("cnnkernels::add_relu");
  return call(op, input, other);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  std::vector<std::string> kernels = {"cpu:add_relu", "cpu:conv2d_bias_act", "cpu:conv3x3_winograd", "cpu:relu_backward_bias_grad"};
#ifdef CNNKERNELS_WITH_CUDA
  for (const auto& name : cnnkernels::cuda_kernel_names()) kernels.push_back("cuda:" + name);
#endif
  m.attr("torch_version") = CNNKERNELS_TORCH_VERSION;
  m.attr("cuda_version") = CNNKERNELS_CUDA_VERSION;  // empty for a CPU-only build
  m.attr("cuda_archs") = CNNKERNELS_CUDA_ARCHS;
  m.attr("kernels") = kernels;
  m.def("cpu_winograd_runs", &cnnkernels::cpu::winograd_runs,
        "How many convs this process has completed through the CPU Winograd kernel");
  m.def("cpu_tiny_conv_runs", &cnnkernels::cpu::tiny_conv_runs,
        "How many convs this process has run as tiny convs through ATen's im2col + GEMM kernel");
  m.def("cpu_relu_post_op_runs", &cnnkernels::cpu::relu_post_op_conv_runs,
        "How many convs this process has run with oneDNN's ReLU post-op instead of the ReLU pass");
  m.def(
      "cpu_conv_runs_in_fp32", [](const at::Tensor& like) { return cnnkernels::cpu::conv_runs_in_fp32(like.scalar_type()); },
      "Whether the CPU kernels run convs of this tensor's dtype in fp32 on this CPU (16-bit dtypes oneDNN lacks here)");
  m.def("conv2d_relu", &conv2d_relu, "torch.ops.cnnkernels.conv2d_relu, for plain eager calls");
  m.def("conv2d_add_relu", &conv2d_add_relu, "torch.ops.cnnkernels.conv2d_add_relu, for plain eager calls");
  m.def("add_relu", &add_relu, "torch.ops.cnnkernels.add_relu, for plain eager calls");
#ifdef CNNKERNELS_WITH_CUDA
  m.def(
      "cutlass_plan",
      [](const at::Tensor& input, const at::Tensor& weight, const IntList& stride, const IntList& padding,
         const IntList& dilation, int64_t groups, bool gemm_routes) {
        const auto plan =
            cnnkernels::cuda::describe_cutlass_plan(input, weight, stride, padding, dilation, groups, gemm_routes);
        pybind11::dict summary;
        summary["kernel"] = plan.kernel;
        summary["tile_n"] = plan.tile_n;
        summary["packs_windows"] = plan.packs_windows;
        summary["subsamples"] = plan.subsamples;
        summary["images_per_pass"] = plan.images_per_pass;
        summary["problem"] = plan.problem;
        summary["unsupported"] = plan.unsupported;
        return summary;
      },
      "How the CUDA backend would run a bf16/fp16 conv on an sm_90 GPU, from the host-side planning and "
      "CUTLASS's can_implement only (no device is touched; meta tensors will do)",
      pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("stride"), pybind11::arg("padding"),
      pybind11::arg("dilation"), pybind11::arg("groups"), pybind11::arg("gemm_routes") = true);
#endif
}
