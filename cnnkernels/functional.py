"""The public functions. Each validates and normalizes its arguments (_args.py), asks
backends.select() which implementation runs, and calls it. A repeated call of the same
signature skips the first two: _call_plans.py remembers their outcome."""
import torch
from torch.overrides import handle_torch_function

from . import _call_plans, auto_choice, backends
from ._args import PLAIN_TENSORS, ConvCall, check_add_relu, conv_call


def _traced(*args):
    """The arguments that are not tensors but take part in __torch_function__: torch.fx's Proxy.
    A call with some is handed to them, as torch.nn.functional does, so that torch.fx records it
    as one node instead of failing on the argument checks. (Tensor subclasses and function modes
    keep their way: the torch.ops call below reaches them.)"""
    return [a for a in args if a is not None and not isinstance(a, torch.Tensor)
            and hasattr(type(a), "__torch_function__")]


def _run_conv(op, input, weight, bias, residual, stride, padding, dilation, groups):
    key = _call_plans.conv_key(op, backends.get_backend(), input, weight, bias, residual, stride, padding, dilation,
                               groups)
    plan = _call_plans.get(key)
    if plan is not None:
        backend, stride, padding, dilation = plan
        return backend.conv(ConvCall(input, weight, bias, residual, stride, padding, dilation, groups, False))
    call = conv_call(op, input, weight, bias, stride, padding, dilation, groups, residual=residual,
                     needs_residual=op == "conv2d_add_relu")
    backend = backends.select(op, call.input.device, lambda b: b.conv_unsupported(call),
                              lambda: auto_choice.conv_class(call))
    if not call.unbatched and call.input is input:  # not reshaped (unbatched) or padded ('same', even kernel)
        _call_plans.keep(key, (backend, call.stride, call.padding, call.dilation))
    out = backend.conv(call)
    return out.squeeze(0) if call.unbatched else out


def _autocast_dtype(input):
    """The dtype autocast runs convolutions in here, or None outside autocast."""
    if not torch._C._is_any_autocast_enabled():  # the common case first: this runs on every call
        return None
    device_type = input.device.type if isinstance(input, torch.Tensor) else None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(dtype, *tensors):
    """Autocast's cast for a convolution: float64 operands are left as they are, as autocast leaves them."""
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups))."""
    if type(input) not in PLAIN_TENSORS or type(weight) not in PLAIN_TENSORS:
        traced = _traced(input, weight, bias)
        if traced:
            return handle_torch_function(conv2d_relu, traced, input, weight, bias, stride, padding, dilation, groups)
    dtype = _autocast_dtype(input)
    if dtype is not None:  # as autocast runs F.conv2d: every operand in its dtype
        input, weight, bias = _cast(dtype, input, weight, bias)
    return _run_conv("conv2d_relu", input, weight, bias, None, stride, padding, dilation, groups)


def conv2d_add_relu(input, weight, residual, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, ...) + residual): a ResNet block's tail."""
    if type(input) not in PLAIN_TENSORS or type(weight) not in PLAIN_TENSORS or type(residual) not in PLAIN_TENSORS:
        traced = _traced(input, weight, residual, bias)
        if traced:
            return handle_torch_function(conv2d_add_relu, traced, input, weight, residual, bias, stride, padding,
                                         dilation, groups)
    dtype = _autocast_dtype(input)
    if dtype is not None:
        input, weight, bias = _cast(dtype, input, weight, bias)
        if isinstance(residual, torch.Tensor) and residual.is_floating_point() and residual.dtype != input.dtype:
            # Eager autocast adds such a residual after the conv, in the promoted dtype: the
            # reference path computes exactly that (the checks see the residual cast).
            call = conv_call("conv2d_add_relu", input, weight, bias, stride, padding, dilation, groups,
                             residual=residual.to(input.dtype), needs_residual=True)
            call.residual = residual.unsqueeze(0) if call.unbatched else residual
            out = backends.BACKENDS["torch"].conv(call)
            return out.squeeze(0) if call.unbatched else out
    return _run_conv("conv2d_add_relu", input, weight, bias, residual, stride, padding, dilation, groups)


def add_relu(input, other):
    """relu(input + other), for tensors of the same shape, dtype and device."""
    if type(input) not in PLAIN_TENSORS or type(other) not in PLAIN_TENSORS:
        traced = _traced(input, other)
        if traced:
            return handle_torch_function(add_relu, traced, input, other)
    key = _call_plans.add_relu_key(backends.get_backend(), input, other)
    backend = _call_plans.get(key)
    if backend is None:
        check_add_relu(input, other)
        backend = backends.select("add_relu", input.device, lambda b: b.add_relu_unsupported(input, other),
                                  lambda: auto_choice.add_relu_class(input))
        _call_plans.keep(key, backend)
    return backend.add_relu(input, other)
