"""Python-side registrations for the ops: fake (meta) kernels for the C++ ops, and autograd
for the Triton ops: the same rule registered with torch.library (for the dispatcher: compile,
dispatch modes) and as an autograd.Function (for plain eager calls, which skip the dispatcher's
host cost; see triton_ops/_runtime.call_op). The C++ ops' autograd is registered in C++
(csrc/autograd.cpp), with the same rules, so that their calls pay no Python.

The backward saves only the output (for the ReLU mask) and the conv's operands. With a bias, one
fused pass of our own (relu_backward_bias_grad, from the same backend as the forward) masks the
gradient and sums it per channel into the bias gradient; without one, aten.threshold_backward
masks it. The masked gradient is the residual's gradient as it is, and aten.convolution_backward
(cuDNN, oneDNN) gives the input and weight gradients.
"""
from typing import Callable, NamedTuple

import torch

from ._args import conv_output_memory_format, empty_add_relu_output, memory_format_of


def conv_output_shape(input, weight, stride, padding, dilation):
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return (n, k, oh, ow)


def empty_conv_output(input, weight, stride, padding, dilation):
    """An uninitialized output with the shape, dtype and strides the real kernels produce."""
    return torch.empty(conv_output_shape(input, weight, stride, padding, dilation), dtype=input.dtype,
                       device=input.device, memory_format=conv_output_memory_format(input, weight))


def _fake_conv2d_relu(input, weight, bias, stride, padding, dilation, groups):
    return empty_conv_output(input, weight, stride, padding, dilation)


def _fake_conv2d_add_relu(input, weight, residual, bias, stride, padding, dilation, groups):
    return empty_conv_output(input, weight, stride, padding, dilation)


def _fake_add_relu(input, other):
    return empty_add_relu_output(input, other)


def _fake_relu_backward_bias_grad(grad, output):
    grad_pre_relu = torch.empty_like(output, memory_format=memory_format_of(output))
    return grad_pre_relu, output.new_empty(output.shape[1])


def _setup_conv2d_relu(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight, output)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _setup_conv2d_add_relu(ctx, inputs, output):
    input, weight, residual, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight, output)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _conv_grads(ctx, grad, bias_index, relu_backward_bias_grad):
    input, weight, output = ctx.saved_tensors
    if ctx.has_bias and ctx.needs_input_grad[bias_index]:
        grad_pre_relu, grad_bias = relu_backward_bias_grad(grad, output)
    else:
        grad_pre_relu, grad_bias = torch.ops.aten.threshold_backward(grad, output, 0), None
    stride, padding, dilation, groups = ctx.geometry
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
    grad_input = grad_weight = None
    if any(mask):
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_pre_relu, input, weight, None, stride, padding, dilation, False, [0, 0], groups, mask)
    return grad_pre_relu, grad_input, grad_weight, grad_bias


def _conv_backwards(relu_backward_bias_grad):
    """The backward functions of conv2d_relu and conv2d_add_relu with the given fused ReLU backward."""

    def conv2d_relu_backward(ctx, grad):
        _, grad_input, grad_weight, grad_bias = _conv_grads(ctx, grad, 2, relu_backward_bias_grad)
        return grad_input, grad_weight, grad_bias, None, None, None, None

    def conv2d_add_relu_backward(ctx, grad):
        grad_pre_relu, grad_input, grad_weight, grad_bias = _conv_grads(ctx, grad, 3, relu_backward_bias_grad)
        return grad_input, grad_weight, grad_pre_relu, grad_bias, None, None, None, None

    return conv2d_relu_backward, conv2d_add_relu_backward


def _setup_add_relu(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_add_relu(ctx, grad):
    (output,) = ctx.saved_tensors
    grad_pre_relu = torch.ops.aten.threshold_backward(grad, output, 0)
    return grad_pre_relu, grad_pre_relu


def _setup_relu_backward_bias_grad(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward_relu_backward_bias_grad(ctx, grad_grad_pre_relu, grad_grad_bias):
    """relu_backward_bias_grad is linear in grad: its gradient masks the incoming gradients (the
    bias gradient's broadcast over N, H, W) as threshold_backward does, and none flows to the
    output (threshold_backward's rule). Double backward (create_graph=True) through the conv ops
    differentiates it."""
    (output,) = ctx.saved_tensors
    g = grad_grad_pre_relu
    if grad_grad_bias is not None:
        per_channel = grad_grad_bias.view(1, -1, 1, 1)
        g = per_channel.expand_as(output) if g is None else g + per_channel
    return (None if g is None else torch.ops.aten.threshold_backward(g, output, 0)), None


class AutogradRule(NamedTuple):
    op: str  # the op's name without backend suffix
    setup_context: Callable
    backward: Callable


def autograd_rules(relu_backward_bias_grad):
    """{op name without suffix: AutogradRule} for conv2d_relu, conv2d_add_relu and add_relu, whose
    backward runs the given fused ReLU backward, and for that relu_backward_bias_grad."""
    conv2d_relu_backward, conv2d_add_relu_backward = _conv_backwards(relu_backward_bias_grad)
    rules = [AutogradRule("conv2d_relu", _setup_conv2d_relu, conv2d_relu_backward),
             AutogradRule("conv2d_add_relu", _setup_conv2d_add_relu, conv2d_add_relu_backward),
             AutogradRule("add_relu", _setup_add_relu, _backward_add_relu),
             AutogradRule("relu_backward_bias_grad", _setup_relu_backward_bias_grad,
                          _backward_relu_backward_bias_grad)]
    return {rule.op: rule for rule in rules}


def register_autograd(suffix, rules):
    """Registers `rules` as the autograd of the ops cnnkernels::{rule.op}{suffix}."""
    for rule in rules.values():
        torch.library.register_autograd(f"cnnkernels::{rule.op}{suffix}", rule.backward, setup_context=rule.setup_context)


def autograd_function(body, rule: AutogradRule):
    """An autograd.Function that runs `body` (an op's Python body) with the op's registered
    autograd rule: the same backward, without the dispatcher's custom-op autograd around it."""

    def forward(ctx, *args):
        output = body(*args)
        rule.setup_context(ctx, args, output)
        return output

    # Named so that autograd graphs show cnnkernels_conv2d_reluBackward and the like.
    return type(f"cnnkernels_{rule.op}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(rule.backward)})


def register_extension_ops():
    """Fake kernels for the C++ ops (their schemas live in csrc/ops.cpp, their autograd in
    csrc/autograd.cpp)."""
    torch.library.register_fake("cnnkernels::conv2d_relu")(_fake_conv2d_relu)
    torch.library.register_fake("cnnkernels::conv2d_add_relu")(_fake_conv2d_add_relu)
    torch.library.register_fake("cnnkernels::add_relu")(_fake_add_relu)
    torch.library.register_fake("cnnkernels::relu_backward_bias_grad")(_fake_relu_backward_bias_grad)
