// Argument checks and shape arithmetic shared by every C++ kernel (CPU and CUDA).
// The Python front end runs the same checks first (cnnkernels/_args.py), so these
// only fire when torch.ops.cnnkernels.* is called directly; they keep kernels memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace cnnkernels {

struct ConvShape {
  int64_t N, C, H, W;      // input (logical NCHW)
  int64_t K, R, S;         // output channels, kernel rows, kernel columns
  int64_t OH, OW;          // output spatial size
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
};

// Validates a fused conv call and returns its geometry. `residual` may be undefined.
ConvShape check_conv2d_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups);

void check_add_relu_args(const at::Tensor& input, const at::Tensor& other);

// An empty tensor laid out as torch lays out relu(input + other) (cnnkernels/_args.py has the
// same rule for the Triton op), and an operand as a tensor laid out like it: the operand itself
// where its elements already sit where the output's do, otherwise one copy. With both operands
// so, one pass in storage order computes the output.
at::Tensor empty_add_relu_output(const at::Tensor& input, const at::Tensor& other);
at::Tensor laid_out_as(const at::Tensor& operand, const at::Tensor& output);

// grad and output of relu_backward_bias_grad: 4-D (N, C, H, W), same size, dtype and device.
void check_relu_backward_args(const at::Tensor& grad, const at::Tensor& output);

// The memory format of a conv's output (and of its input gradient), as torch.nn.functional.conv2d
// gives it: channels_last when the input or the weight is, contiguous otherwise, and contiguous
// for an empty batch (ATen's empty-input path).
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  const auto CL = at::MemoryFormat::ChannelsLast;
  if (input.sym_numel() == 0) return at::MemoryFormat::Contiguous;
  return input.suggest_memory_format() == CL || weight.suggest_memory_format() == CL ? CL
                                                                                      : at::MemoryFormat::Contiguous;
}

// The dilation to hand to ATen's convolutions: 1 along a kernel dimension of size 1, where any
// dilation computes the same, since oneDNN (F.conv2d on the CPU, torch 2.14.1) read out of bounds
// and crashed with it on channels_last tensors of width or height 1-2 (_args.conv_call does the
// same in Python).
inline std::vector<int64_t> effective_dilation(const at::Tensor& weight, at::IntArrayRef dilation) {
  return {weight.size(2) == 1 ? 1 : dilation[0], weight.size(3) == 1 ? 1 : dilation[1]};
}

}  // namespace cnnkernels
