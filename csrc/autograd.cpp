// Autograd for the C++ ops (cnnkernels::conv2d_relu, conv2d_add_relu, add_relu and the
// backward's relu_backward_bias_grad), registered in C++ so that a call pays no Python: the same
// rules registered from Python cost 20-40 us more per conv call (measured on the CPU here), which
// small layers and small models feel. The Triton ops keep the Python registration
// (cnnkernels/_registration.py), with the same rules:
//   - only the input, the weight and the output are saved; the ReLU mask comes from the output;
//   - with a bias that needs a gradient, cnnkernels::relu_backward_bias_grad masks the gradient
//     and sums it per channel in one pass; without one, aten::threshold_backward masks it;
//   - the masked gradient is the residual's gradient as it is (no copy);
//   - aten::convolution_backward (cuDNN, oneDNN) gives the input and weight gradients (on the CPU,
//     in fp32 for the bf16 convs oneDNN gets wrong: cpu::conv_backward), except
//     the input gradient of fp32 3x3 stride-1 convs on the CPU, which Winograd computes where it
//     suits (csrc/cpu/winograd.h); and both gradients of tiny
//     fp32 CPU convs, which ATen's im2col + GEMM backward computes (csrc/cpu/conv2d_relu.h):
//     1.3-3.4x faster than oneDNN's there.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "conv_args.h"
#include "cpu/conv2d_relu.h"
#include "cpu/winograd.h"

namespace cnnkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void save_conv(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  ctx->save_for_backward({input, weight, output});
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = effective_dilation(weight, dilation);
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
}

// A real CPU tensor: not a fake or functional one, which torch.compile traces the backward with.
bool plain_cpu(const at::Tensor& t) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.device().is_cpu() && t.layout() == at::kStrided && (t.key_set() & traced).empty();
}

struct ConvGrads {
  at::Tensor pre_relu, input, weight, bias;
};

// The gradients of relu(conv(input, weight) + bias (+ residual)); bias_index is the bias's
// position among the op's arguments.
ConvGrads conv_grads(AutogradContext* ctx, const at::Tensor& grad, size_t bias_index) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &input = saved[0], &weight = saved[1], &output = saved[2];
  ConvGrads grads;
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(bias_index)) {
    static const auto fused = op_handle("cnnkernels::relu_backward_bias_grad")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    std::tie(grads.pre_relu, grads.bias) = fused.call(grad, output);
  } else {
    grads.pre_relu = at::threshold_backward(grad, output, 0);
  }
  const bool input_grad = ctx->needs_input_grad(0), weight_grad = ctx->needs_input_grad(1);
  if (!input_grad && !weight_grad) return grads;
  if (input.sym_numel() == 0) {  // an empty batch: ATen's CPU conv backward refuses an empty image even then
    if (input_grad) grads.input = at::zeros_like(input);
    if (weight_grad) grads.weight = at::zeros_like(weight);
    return grads;
  }
  const auto stride = ctx->saved_data["stride"].toIntVector();
  const auto padding = ctx->saved_data["padding"].toIntVector();
  const auto dilation = ctx->saved_data["dilation"].toIntVector();
  const int64_t groups = ctx->saved_data["groups"].toInt();
  const bool real_cpu = plain_cpu(grads.pre_relu) && plain_cpu(input) && plain_cpu(weight);
  // Not while recording a graph of the backward (create_graph=True): Winograd has no autograd.
  const bool plain = !at::GradMode::is_enabled() && real_cpu;
  if (plain) {
    std::tie(grads.input, grads.weight) = cpu::tiny_conv_backward(grads.pre_relu, input, weight, stride, padding,
                                                                  dilation, groups, input_grad, weight_grad);
    if (grads.input.defined() || grads.weight.defined()) return grads;
  }
  if (input_grad && plain) {
    const auto direct = [&] {
      return std::get<0>(cpu::conv_backward(grads.pre_relu, input, weight, stride, padding, dilation, groups,
                                            /*input_grad=*/true, /*weight_grad=*/false, real_cpu));
    };
    grads.input =
        cpu::winograd_conv2d_input_grad(grads.pre_relu, input, weight, stride, padding, dilation, groups, direct);
  }
  const bool input_left = input_grad && !grads.input.defined();
  if (input_left || weight_grad) {
    at::Tensor grad_input;
    if (input.device().is_cpu() && input.layout() == at::kStrided) {  // also what torch.compile traces
      std::tie(grad_input, grads.weight) = cpu::conv_backward(grads.pre_relu, input, weight, stride, padding,
                                                              dilation, groups, input_left, weight_grad, real_cpu);
    } else {
      std::tie(grad_input, grads.weight, std::ignore) = at::convolution_backward(
          grads.pre_relu, input, weight, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
          {0, 0}, groups, {input_left, weight_grad, false});
    }
    if (input_left) grads.input = grad_input;
  }
  return grads;
}

class Conv2dReLU : public torch::autograd::Function<Conv2dReLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    static const auto op = op_handle("cnnkernels::conv2d_relu")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                                 at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = op.call(input, weight, bias, stride, padding, dilation, groups);
    save_conv(ctx, input, weight, output, bias, stride, padding, dilation, groups);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ConvGrads g = conv_grads(ctx, grad_outputs[0], 2);
    return {g.input, g.weight, g.bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class Conv2dAddReLU : public torch::autograd::Function<Conv2dAddReLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& residual, const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
    static const auto op = op_handle("cnnkernels::conv2d_add_relu")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&, at::IntArrayRef,
                                                 at::IntArrayRef, at::IntArrayRef, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = op.call(input, weight, residual, bias, stride, padding, dilation, groups);
    save_conv(ctx, input, weight, output, bias, stride, padding, dilation, groups);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ConvGrads g = conv_grads(ctx, grad_outputs[0], 3);
    const at::Tensor grad_residual = ctx->needs_input_grad(2) ? g.pre_relu : at::Tensor();
    return {g.input, g.weight, grad_residual, g.bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class AddReLU : public torch::autograd::Function<AddReLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& other) {
    static const auto op =
        op_handle("cnnkernels::add_relu").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = op.call(input, other);
    ctx->save_for_backward({output});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor grad = at::threshold_backward(grad_outputs[0], ctx->get_saved_variables()[0], 0);
    return {grad, grad};
  }
};

// relu_backward_bias_grad is linear in grad: its gradient masks the incoming gradients (the bias
// gradient's broadcast over N, H, W) as threshold_backward does, and none flows to the output
// (threshold_backward's rule). It is what double backward (create_graph=True) through the conv
// ops differentiates; without it autograd's fallback left those gradients silently wrong.
class ReluBackwardBiasGrad : public torch::autograd::Function<ReluBackwardBiasGrad> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& output) {
    static const auto op = op_handle("cnnkernels::relu_backward_bias_grad")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_pre_relu, grad_bias] = op.call(grad, output);
    ctx->save_for_backward({output});
    return {grad_pre_relu, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor output = ctx->get_saved_variables()[0];
    at::Tensor g = grad_outputs[0];
    if (grad_outputs[1].defined()) {
      const at::Tensor per_channel = grad_outputs[1].view({1, -1, 1, 1});
      g = g.defined() ? g + per_channel : per_channel.expand_as(output);
    }
    return {g.defined() ? at::threshold_backward(g, output, 0) : at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return Conv2dReLU::apply(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d_add_relu_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                                    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return Conv2dAddReLU::apply(input, weight, residual, bias, stride, padding, dilation, groups);
}

at::Tensor add_relu_autograd(const at::Tensor& input, const at::Tensor& other) {
  return AddReLU::apply(input, other);
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_grad_autograd(const at::Tensor& grad, const at::Tensor& output) {
  const variable_list grads = ReluBackwardBiasGrad::apply(grad, output);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnkernels, Autograd, m) {
  m.impl("conv2d_relu", &conv2d_relu_autograd);
  m.impl("conv2d_add_relu", &conv2d_add_relu_autograd);
  m.impl("add_relu", &add_relu_autograd);
  m.impl("relu_backward_bias_grad", &relu_backward_bias_grad_autograd);
}

}  // namespace cnnkernels
