// Conv + bias (+ residual) + ReLU on the CPU. Where PyTorch ships oneDNN, this is one oneDNN
// convolution with the ReLU (and the residual add) fused as post-ops, the same primitive
// PyTorch's own CPU fusion uses (mkldnn::_convolution_pointwise). Otherwise, and for dtypes
// oneDNN does not take here, it is ATen's convolution (bias included) followed by one fused
// residual+ReLU pass in place.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../conv_args.h"
#include "elementwise.h"

namespace cnnkernels::cpu {
namespace {

bool cpu_has_onednn_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

bool onednn_takes(const at::Tensor& input) {
  if (!at::hasMKLDNN()) return false;
  switch (input.scalar_type()) {
    case at::kFloat: return true;
    case at::kBFloat16: return cpu_has_onednn_bf16();
    default: return false;
  }
}

c10::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

at::Tensor conv_onednn(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  static const auto unary = find_op("mkldnn::_convolution_pointwise", "");
  static const auto binary = find_op("mkldnn::_convolution_pointwise", "binary");
  const c10::IValue none;
  const c10::List<c10::optional<at::Scalar>> no_scalars;
  const c10::IValue b = (bias.has_value() && bias->defined()) ? c10::IValue(*bias) : none;
  torch::jit::Stack stack;
  if (residual.defined()) {
    stack = {x, residual, w, b, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string("add"), none, std::string("relu"), no_scalars, none};
    binary->callBoxed(&stack);
  } else {
    stack = {x, w, b, padding.vec(), stride.vec(), dilation.vec(), groups,
             std::string("relu"), no_scalars, none};
    unary->callBoxed(&stack);
  }
  return stack.at(0).toTensor();
}

at::Tensor conv2d_bias_act_cpu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  check_conv2d_args(op, input, weight, bias, residual, stride, padding, dilation, groups);
  const auto format = output_memory_format(input);
  const at::Tensor x = input.contiguous(format);
  // oneDNN picks channels_last when either operand is: keep the weight in the input's format
  // so the output comes out in it without a copy.
  const at::Tensor w = weight.contiguous(format);
  const at::Tensor r = residual.defined() ? residual.contiguous(format) : residual;

  at::Tensor out;
  static const bool have_onednn_ops = find_op("mkldnn::_convolution_pointwise", "").has_value() &&
                                      find_op("mkldnn::_convolution_pointwise", "binary").has_value();
  if (have_onednn_ops && onednn_takes(x)) {
    out = conv_onednn(x, w, bias, r, stride, padding, dilation, groups);
    if (!out.is_contiguous(format)) out = out.contiguous(format);
    return out;
  }
  out = at::convolution(x, w, bias, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups)
            .contiguous(format);
  add_relu_dense(out, r, out);
  return out;
}

at::Tensor conv2d_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_bias_act_cpu("conv2d_relu", input, weight, bias, at::Tensor(), stride, padding,
                             dilation, groups);
}

at::Tensor conv2d_add_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_bias_act_cpu("conv2d_add_relu", input, weight, bias, residual, stride, padding,
                             dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_add_relu", &conv2d_add_relu_cpu);
}

}  // namespace cnnkernels::cpu
