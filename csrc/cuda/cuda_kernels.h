// What the CUDA part of the extension holds, for the build information of cnnkernels._C, and the
// host-side planning of its convs, for tests on machines without a GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace cnnkernels {

// The kernels compiled into this build, e.g. "add_relu", "conv_implicit_gemm",
// "conv_cutlass_sm90_bf16". Whether the sm90 ones can run is decided per device at run time.
std::vector<std::string> cuda_kernel_names();

namespace cuda {

// How the CUDA backend would run a bf16/fp16 conv on an sm_90 device (csrc/cuda/conv.cu).
struct CutlassPlanSummary {
  std::string kernel;           // "gemm" (the persistent GEMM) or "conv" (the conv kernel); empty without CUTLASS
  int64_t tile_n = 0;           // the kernel's output-channel tile width
  bool packs_windows = false;   // a stem, run as a 1x1 conv over its packed windows
  bool subsamples = false;      // a strided 1x1 conv, run over a copy of every stride-th pixel
  int64_t images_per_pass = 0;  // images per launch: all, or fewer for a stem's packed windows
  std::vector<int64_t> problem; // what one pass runs: N, H, W, C, K, R, S, P, Q, pad, stride, dilation (h, w)
  std::string unsupported;      // why CUTLASS cannot take it (the text of the error it raises); empty if it can
};

// The planning and CUTLASS's own host-side checks (can_implement) only: no device is touched, so
// `input` and `weight` (for their sizes and dtype) may be meta tensors. `gemm_routes` false plans
// as CNNKERNELS_CUDA_CONV=cutlass-conv does.
CutlassPlanSummary describe_cutlass_plan(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         bool gemm_routes);

}  // namespace cuda

}  // namespace cnnkernels
