#pragma once
#include <ATen/ATen.h>

// Marks a loop function to be compiled for AVX-512 (x86-64-v4: F, BW, DQ, VL), AVX2 and baseline
// x86-64, the best one picked when the extension loads: vectorized code that still runs on any
// x86-64 CPU. AVX-512 F alone (the clone this replaced) cannot vectorize 16-bit loops at full
// width: bf16 add_relu's loop ran 2.7x slower in it (0.24 vs 0.09 ns per element, Zen 5).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CNNKERNELS_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CNNKERNELS_VECTOR_CLONES
#endif

namespace cnnkernels::cpu {

// out = relu(a + b) over `a`'s elements in storage order, or out = relu(a) when `b` is
// undefined. a, b and out must be dense with identical strides; out may be a (in place).
void add_relu_dense(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);

}  // namespace cnnkernels::cpu
