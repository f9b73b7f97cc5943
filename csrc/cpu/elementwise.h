#pragma once
#include <ATen/ATen.h>

namespace cnnkernels::cpu {

// out = relu(a + b) over `a`'s elements in storage order, or out = relu(a) when `b` is
// undefined. a, b and out must be dense with identical strides; out may be a (in place).
void add_relu_dense(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);

}  // namespace cnnkernels::cpu
