"""The public functions. Each validates and normalizes its arguments (_args.py), asks
backends.select() which implementation runs, and calls it."""
import torch

from . import auto_choice, backends
from ._args import check_add_relu, conv_call


def _run_conv(call, op):
    backend = backends.select(op, call.input.device, lambda b: b.conv_unsupported(call),
                              lambda: auto_choice.conv_class(call))
    out = backend.conv(call)
    return out.squeeze(0) if call.unbatched else out


def _autocast_dtype(input):
    """The dtype autocast runs convolutions in here, or None outside autocast."""
    device_type = input.device.type if isinstance(input, torch.Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(dtype, *tensors):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups))."""
    dtype = _autocast_dtype(input)
    if dtype is not None:  # as autocast runs F.conv2d: every operand in its dtype
        input, weight, bias = _cast(dtype, input, weight, bias)
    call = conv_call("conv2d_relu", input, weight, bias, stride, padding, dilation, groups)
    return _run_conv(call, "conv2d_relu")


def conv2d_add_relu(input, weight, residual, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, ...) + residual): a ResNet block's tail."""
    dtype = _autocast_dtype(input)
    other_dtype_residual = None
    if dtype is not None:
        input, weight, bias = _cast(dtype, input, weight, bias)
        if isinstance(residual, torch.Tensor) and residual.is_floating_point() and residual.dtype != dtype:
            other_dtype_residual, residual = residual, residual.to(dtype)  # the cast copy only for the checks
    call = conv_call("conv2d_add_relu", input, weight, bias, stride, padding, dilation, groups,
                     residual=residual, needs_residual=True)
    if other_dtype_residual is not None:
        # Eager autocast adds such a residual after the conv, in the promoted dtype: the
        # reference path computes exactly that.
        call.residual = other_dtype_residual.unsqueeze(0) if call.unbatched else other_dtype_residual
        out = backends.BACKENDS["torch"].conv(call)
        return out.squeeze(0) if call.unbatched else out
    return _run_conv(call, "conv2d_add_relu")


def add_relu(input, other):
    """relu(input + other), for tensors of the same shape, dtype and device."""
    check_add_relu(input, other)
    backend = backends.select("add_relu", input.device, lambda b: b.add_relu_unsupported(input, other),
                              lambda: auto_choice.add_relu_class(input))
    return backend.add_relu(input, other)
