// Conv + bias (+ residual) + ReLU on the CPU. 3x3 stride-1 fp32 convs with enough channels run
// through Winograd with the epilogue fused (winograd.cpp). Others: the convolution with its
// bias, then one fused residual+ReLU pass in place.
// For channels_last input the convolution is oneDNN's (mkldnn::_convolution_pointwise, the
// primitive PyTorch's own CPU fusion uses) with the weight handed over already reordered into
// oneDNN's blocked layout (cached: weight_cache.h), which saves 1.1-2.3x on layers with large
// weights and small images (measured at batch 4, fp32). Otherwise (NCHW input, tiny or changing
// weights) it is at::convolution, as F.conv2d runs it: there the boxed oneDNN call only adds
// cost (1x1 64->64 at 56x56, batch 1, NCHW: 345 vs 286 us).
// oneDNN's fused ReLU post-op is not used because it turns NaN into 0 (measured here with
// torch 2.14.1), where torch.relu keeps NaN.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../conv_args.h"
#include "elementwise.h"
#include "weight_cache.h"
#include "winograd.h"

namespace cnnkernels::cpu {
namespace {

c10::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

at::Tensor conv_onednn(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  static const auto op = find_op("mkldnn::_convolution_pointwise", "");
  const c10::IValue none;
  torch::jit::Stack stack{x, w, (bias.has_value() && bias->defined()) ? c10::IValue(*bias) : none,
                          padding.vec(), stride.vec(), dilation.vec(), groups, std::string("none"),
                          c10::List<c10::optional<at::Scalar>>(), none};
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// The weight in oneDNN's blocked layout for this geometry. oneDNN reorders a weight that is not
// dense itself, on each call.
at::Tensor reorder_for_onednn(const at::Tensor& w, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!w.is_non_overlapping_and_dense()) return w;
  static const auto reorder = find_op("mkldnn::_reorder_convolution_weight", "");
  torch::jit::Stack stack{w, padding.vec(), stride.vec(), dilation.vec(), groups, input_sizes.vec()};
  reorder->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// PyTorch's oneDNN takes bf16 only on CPUs with AVX-512 BW/VL/DQ (mkldnn_bf16_device_check).
bool cpu_runs_onednn_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// Whether the reordered-weight oneDNN path runs this conv: oneDNN is there and takes the dtype,
// the weight is big enough for reordering it once to pay for the boxed call (below 1024 elements,
// e.g. LeNet's first conv, at::convolution is ~10% faster), and the problem is not a single small
// image with small kernels, where ATen's own kernel is several times faster than setting up a
// oneDNN primitive (14 vs 43 us for 1x4x8x8, 3x3; ATen's own rule, use_mkldnn in Convolution.cpp).
bool reordered_onednn_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  static const bool have_op = at::hasMKLDNN() && find_op("mkldnn::_convolution_pointwise", "").has_value() &&
                              find_op("mkldnn::_reorder_convolution_weight", "").has_value();
  const bool dtype_ok = x.scalar_type() == at::kFloat ||
                        (x.scalar_type() == at::kBFloat16 && cpu_runs_onednn_bf16());
  const bool small = x.size(0) == 1 && groups == 1 && !(w.size(2) > 3 && w.size(3) > 3) && x.numel() <= 20480;
  return have_op && dtype_ok && w.numel() >= 1024 && !small;
}

at::Tensor conv2d_bias_act_cpu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  check_conv2d_args(op, input, weight, bias, residual, stride, padding, dilation, groups);
  const auto format = output_memory_format(input);
  if (at::Tensor out = winograd_conv2d_bias_relu(input, weight, bias, residual, stride, padding, dilation, groups);
      out.defined()) {
    return out;
  }
  const at::Tensor x = input.contiguous(format);
  const at::Tensor r = residual.defined() ? residual.contiguous(format) : residual;

  // The reordered weight makes oneDNN compute in channels_last: only for channels_last input. A
  // weight that changes between calls (training) is not reordered: at::convolution takes it.
  at::Tensor reordered;
  if (format == at::MemoryFormat::ChannelsLast && reordered_onednn_takes(x, weight, groups)) {
    const PreparedWeight prepared = prepared_weight(
        WeightForm::kOneDnnBlocked, weight, x.sizes(), stride, padding, dilation, groups,
        [&] { return reorder_for_onednn(weight, x.sizes(), stride, padding, dilation, groups); });
    if (!prepared.changing) reordered = prepared.tensor;
  }
  // ATen computes in channels_last when either operand is: NCHW input takes an NCHW weight, so
  // that its output comes out NCHW without a copy back.
  const at::Tensor w = format == at::MemoryFormat::Contiguous ? weight.contiguous() : weight;
  at::Tensor out = reordered.defined()
                       ? conv_onednn(x, reordered, bias, stride, padding, dilation, groups)
                       : at::convolution(x, w, bias, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups);
  out = out.contiguous(format);
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
