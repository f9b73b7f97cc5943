// What the CUDA part of the extension holds, for the build information of cnnkernels._C.
#pragma once

#include <string>
#include <vector>

namespace cnnkernels {

// The kernels compiled into this build, e.g. "add_relu", "conv_implicit_gemm",
// "conv_cutlass_sm90_bf16". Whether the sm90 ones can run is decided per device at run time.
std::vector<std::string> cuda_kernel_names();

}  // namespace cnnkernels
