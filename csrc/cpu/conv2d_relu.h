#pragma once
#include <cstdint>

namespace cnnkernels::cpu {

// How many convs this process has run through ATen's im2col + GEMM kernel as tiny convs
// (conv2d_relu.cpp's tiny_conv; tests check which path ran).
int64_t tiny_conv_runs();

}  // namespace cnnkernels::cpu
