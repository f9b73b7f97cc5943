// The op schemas (the one place they are written) and the Python module `cnnkernels._C`,
// which carries the build information. Kernels register themselves per device in
// csrc/cpu/ and csrc/cuda/ with TORCH_LIBRARY_IMPL, their autograd in csrc/autograd.cpp.
#include <torch/library.h>
#include <torch/extension.h>

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
}
