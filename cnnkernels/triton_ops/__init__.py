"""Triton implementations of the cnnkernels ops, registered as torch.library triton_ops:
cnnkernels::conv2d_relu_triton, cnnkernels::conv2d_add_relu_triton, cnnkernels::add_relu_triton,
the backward's cnnkernels::relu_backward_bias_grad_triton, and train-mode BatchNorm + ReLU
(cnnkernels::batch_norm_relu_train_triton and _backward_triton, differentiable through
batch_norm.batch_norm_relu_train, an autograd.Function, in batch_norm.py).

Import with TRITON_INTERPRET=1 set (before triton is first imported) to run them on CPU tensors.
"""

from .._registration import autograd_rules, register_autograd
from . import _runtime, add_relu as _add_relu, batch_norm as _batch_norm, conv as _conv, relu_backward as _relu_backward  # noqa: F401  (importing registers the ops)
from .add_relu import add_relu_unsupported_reasons
from .conv import unsupported_reasons


def _relu_backward_bias_grad(grad, output):
    return _runtime.call_op(_relu_backward.relu_backward_bias_grad_triton, grad, output,
                            autograd=_AUTOGRAD["relu_backward_bias_grad"])


_AUTOGRAD = autograd_rules(_relu_backward_bias_grad)
register_autograd("_triton", _AUTOGRAD)

# The wrappers below go through _runtime.call_op: plain eager calls skip the dispatcher (those
# autograd tracks run the same autograd rule as an autograd.Function); anything else
# (torch.compile, dispatch modes, the profiler) takes it.


def conv2d_relu_triton(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """relu(conv2d(...)); op-level arguments (4-D input, 2-int stride/padding/dilation)."""
    return _runtime.call_op(
        _conv.conv2d_relu_triton, input, weight, bias, list(stride), list(padding), list(dilation), groups,
        autograd=_AUTOGRAD["conv2d_relu"],
    )


def conv2d_add_relu_triton(
    input, weight, residual, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1
):
    """relu(conv2d(...) + residual); residual has the output's shape."""
    return _runtime.call_op(
        _conv.conv2d_add_relu_triton, input, weight, residual, bias, list(stride), list(padding), list(dilation), groups,
        autograd=_AUTOGRAD["conv2d_add_relu"],
    )


def add_relu_triton(input, other):
    """relu(input + other); same shape and dtype, output laid out as torch.relu(input + other)."""
    return _runtime.call_op(_add_relu.add_relu_triton, input, other, autograd=_AUTOGRAD["add_relu"])


__all__ = [
    "conv2d_relu_triton",
    "conv2d_add_relu_triton",
    "add_relu_triton",
    "unsupported_reasons",
    "add_relu_unsupported_reasons",
]
