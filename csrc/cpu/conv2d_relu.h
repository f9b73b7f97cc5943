#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace cnnkernels::cpu {

// The input and weight gradients (each only if asked) of a tiny fp32 CPU conv (conv2d_relu.cpp's
// tiny_conv), through ATen's im2col + GEMM backward, with the strides convolution_backward gives
// them; two undefined tensors when the conv is not tiny. Plain CPU tensors only, outside autograd
// recording: the caller keeps traced tensors and create_graph=True away.
std::tuple<at::Tensor, at::Tensor> tiny_conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                      const at::Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      int64_t groups, bool input_grad, bool weight_grad);

// aten::convolution_backward's input and weight gradients (each only if asked) of a conv on CPU
// tensors, except that the bf16 convs oneDNN gets wrong (conv2d_relu.cpp's onednn_bf16_gets_wrong)
// run in fp32, rounded to bf16. Without values_readable (the fake tensors torch.compile traces
// with) only the cases known from the shapes do.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                 bool input_grad, bool weight_grad, bool values_readable);

// Whether this CPU runs convs in `dtype` (fp16 or bf16) in fp32, rounded once: where PyTorch's
// oneDNN lacks the dtype, at::convolution's is ATen's slow fallback (conv2d_relu.cpp).
bool conv_runs_in_fp32(at::ScalarType dtype);

// How many tiny-conv passes (forward, or backward) this process has run through ATen's
// im2col + GEMM kernels (tests check which path ran).
int64_t tiny_conv_runs();

// How many convs this process has run with oneDNN's ReLU post-op (conv2d_relu.cpp's
// relu_post_op_exact) instead of the ReLU pass.
int64_t relu_post_op_conv_runs();

}  // namespace cnnkernels::cpu
