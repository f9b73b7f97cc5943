#include "conv_args.h"

#include <algorithm>
#include <optional>

namespace cnnkernels {

static void check_same_kind(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& input, const char* input_name = "input") {
  TORCH_CHECK(t.device() == input.device(), op, ": expected all tensors to be on the same device, but ",
              name, " is on ", t.device(), " and ", input_name, " is on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " to have the same dtype as ",
              input_name, " (", input.scalar_type(), "), but got ", t.scalar_type());
}

ConvShape check_conv2d_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, op, ": expected 4-D input (N, C, H, W), but got input of size ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": expected 4-D weight (out_channels, in_channels/groups, kH, kW), ",
              "but got weight of size ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected a floating-point input, but got ", input.scalar_type());
  check_same_kind(op, "weight", weight, input);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": expected stride, padding and dilation with 2 values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": non-positive stride is not supported, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation should be greater than zero, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": negative padding is not supported, got ",
              padding);
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported, got groups=", groups);

  ConvShape s{};
  s.N = input.size(0); s.C = input.size(1); s.H = input.size(2); s.W = input.size(3);
  s.K = weight.size(0); s.R = weight.size(2); s.S = weight.size(3);
  s.stride_h = stride[0]; s.stride_w = stride[1];
  s.pad_h = padding[0]; s.pad_w = padding[1];
  s.dil_h = dilation[0]; s.dil_w = dilation[1];
  s.groups = groups;
  // An empty weight, refused as by F.conv2d; with no input channels F.conv2d returns an output of
  // 0 channels, not out_channels, so that is refused too (as in _args.check_weight_sizes).
  TORCH_CHECK(s.K >= groups, op, ": given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.R > 0 && s.S > 0, op, ": kernel size should be greater than zero, but got kernel_height: ", s.R,
              " kernel_width: ", s.S);
  TORCH_CHECK(weight.size(1) > 0, op, ": expected weight to be at least 1 at dimension 1 (input channels per ",
              "group), but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.K % groups == 0, op, ": given groups=", groups, ", expected weight to be divisible by ",
              groups, " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.C == weight.size(1) * groups, op, ": given groups=", groups, ", weight of size ",
              weight.sizes(), ", expected input", input.sizes(), " to have ", weight.size(1) * groups,
              " channels, but got ", s.C, " channels instead");
  TORCH_CHECK(s.N == 0 || s.C == 0 || (s.H > 0 && s.W > 0), op,
              ": only zero batch or zero channel inputs are supported, but got input shape: ", input.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_kind(op, "bias", *bias, input);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, op, ": given weight of size ", weight.sizes(),
                ", expected bias to be 1-dimensional with ", s.K, " elements, but got bias of size ",
                bias->sizes(), " instead");
  }
  const int64_t span_h = s.dil_h * (s.R - 1) + 1, span_w = s.dil_w * (s.S - 1) + 1;
  const int64_t padded_h = s.H + 2 * s.pad_h, padded_w = s.W + 2 * s.pad_w;
  TORCH_CHECK(padded_h >= span_h && padded_w >= span_w, op, ": calculated padded input size per channel: (",
              padded_h, " x ", padded_w, "). Kernel size: (", span_h, " x ", span_w,
              "). Kernel size can't be greater than actual input size");
  s.OH = (padded_h - span_h) / s.stride_h + 1;
  s.OW = (padded_w - span_w) / s.stride_w + 1;
  if (residual.defined()) {
    check_same_kind(op, "residual", residual, input);
    TORCH_CHECK(residual.sizes() == at::IntArrayRef({s.N, s.K, s.OH, s.OW}), op,
                ": expected residual of size [", s.N, ", ", s.K, ", ", s.OH, ", ", s.OW,
                "] (the convolution's output), but got residual of size ", residual.sizes());
  }
  return s;
}

void check_add_relu_args(const at::Tensor& input, const at::Tensor& other) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "add_relu: expected a floating-point input, but got ", input.scalar_type());
  check_same_kind("add_relu", "other", other, input);
  TORCH_CHECK(other.sizes() == input.sizes(), "add_relu: expected other of size ", input.sizes(),
              " to match input, but got other of size ", other.sizes());
}

// Contiguous or channels_last, whichever all of `tensors` are (contiguous first), if any.
static std::optional<at::MemoryFormat> common_format(std::initializer_list<at::Tensor> tensors) {
  for (const auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
    if (std::all_of(tensors.begin(), tensors.end(), [&](const at::Tensor& t) { return t.is_contiguous(format); })) {
      return format;
    }
  }
  return std::nullopt;
}

at::Tensor empty_add_relu_output(const at::Tensor& input, const at::Tensor& other) {
  // TensorIterator lays out the sum in the format both operands share (its fast setup), and
  // by its general rule otherwise, asked here of add's meta kernel (no memory, no kernel).
  auto format = common_format({input, other});
  if (!format) {
    const auto on_meta = [](const at::Tensor& t) {
      return at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
    };
    const at::Tensor sum = at::add(on_meta(input), on_meta(other));
    // torch.relu then lays a contiguous or channels_last sum out afresh (the fast setup again,
    // which the meta kernels skip: the strides of size-1 dimensions differ) and keeps any other.
    format = common_format({sum});
    if (!format) return at::empty_strided(input.sizes(), sum.strides(), input.options());
  }
  return at::empty(input.sizes(), input.options().memory_format(*format));
}

at::Tensor laid_out_as(const at::Tensor& operand, const at::Tensor& output) {
  for (int64_t d = 0; d < output.dim(); ++d) {
    if (output.size(d) != 1 && operand.stride(d) != output.stride(d)) {
      return at::empty_like(output).copy_(operand);
    }
  }
  return operand;  // the output is dense, so an operand with its strides is too
}

void check_relu_backward_args(const at::Tensor& grad, const at::Tensor& output) {
  const char* op = "relu_backward_bias_grad";
  TORCH_CHECK(output.dim() == 4, op, ": expected 4-D output (N, C, H, W), but got output of size ",
              output.sizes());
  TORCH_CHECK(at::isFloatingType(output.scalar_type()), op, ": expected a floating-point output, but got ",
              output.scalar_type());
  check_same_kind(op, "grad", grad, output, "output");
  TORCH_CHECK(grad.sizes() == output.sizes(), op, ": expected grad of size ", output.sizes(),
              " to match output, but got grad of size ", grad.sizes());
}

}  // namespace cnnkernels
