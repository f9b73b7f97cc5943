// Winograd F(4x4, 3x3) for 3x3 stride-1 fp32 convs on the CPU (winograd.cpp says why and how).
// Each function returns an undefined tensor when the call does not suit Winograd (not fp32 3x3
// stride 1, dilation 1, groups 1; fewer than 16 input or output channels; too few 4x4 output
// tiles per thread or tiles mostly outside the output) or when its values do not (NaN,
// infinities or huge values, which the transforms would spread or overflow): the caller then
// runs the direct conv. Nor does it run where `direct`, the caller's direct path, measured
// faster for the problem: then it returns undefined too, except on the problem's first call,
// which times both ways and returns the direct path's output (winograd.cpp, measured_faster).
// Outputs take F.conv2d's memory format. CNNKERNELS_CPU_WINOGRAD=0 turns Winograd off, =1 runs
// it wherever the geometry suits, unmeasured.
#pragma once
#include <ATen/ATen.h>

#include <functional>

namespace cnnkernels::cpu {

// relu(conv2d(input, weight) + bias + residual); `residual` may be undefined.
at::Tensor winograd_conv2d_bias_relu(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, const std::function<at::Tensor()>& direct);

// The gradient of conv2d(input, weight) with respect to input, given `grad`, the gradient of its
// output. Only `input`'s sizes and memory format are used. Plain CPU tensors only: the caller
// keeps fake and functional tensors (torch.compile's tracing) away.
at::Tensor winograd_conv2d_input_grad(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, const std::function<at::Tensor()>& direct);

// How many convs this process has completed through Winograd (tests check the path ran).
int64_t winograd_runs();

}  // namespace cnnkernels::cpu
