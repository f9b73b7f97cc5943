"""The public functions. Each validates and normalizes its arguments (_args.py), asks
backends.select() which implementation runs, and calls it."""
from . import backends
from ._args import check_add_relu, conv_call


def _run_conv(call, op):
    backend = backends.select(op, call.input.device, lambda b: b.conv_unsupported(call))
    out = backend.conv(call)
    return out.squeeze(0) if call.unbatched else out


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups))."""
    call = conv_call("conv2d_relu", input, weight, bias, stride, padding, dilation, groups)
    return _run_conv(call, "conv2d_relu")


def conv2d_add_relu(input, weight, residual, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(torch.nn.functional.conv2d(input, weight, bias, ...) + residual): a ResNet block's tail."""
    call = conv_call("conv2d_add_relu", input, weight, bias, stride, padding, dilation, groups,
                     residual=residual, needs_residual=True)
    return _run_conv(call, "conv2d_add_relu")


def add_relu(input, other):
    """relu(input + other), for tensors of the same shape, dtype and device."""
    check_add_relu(input, other)
    backend = backends.select("add_relu", input.device, lambda b: b.add_relu_unsupported(input, other))
    return backend.add_relu(input, other)
