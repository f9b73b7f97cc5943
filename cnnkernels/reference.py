"""The plain-PyTorch implementations: the "torch" backend and the tests' reference."""
import torch
import torch.nn.functional as F

from ._args import conv_output_memory_format


def onednn_may_crash_in_channels_last(input, stride, dilation):
    """Whether oneDNN's channels_last conv (F.conv2d on the CPU, fp32 and bf16, torch 2.14.1 and
    2.11.0) may segfault on this call: an input at most two columns wide (4 with a margin), column
    stride and dilation above 1. The C++ op's rule too (csrc/cpu/conv2d_relu.cpp)."""
    return input.device.type == "cpu" and stride[1] > 1 and dilation[1] > 1 and input.shape[-1] <= 4


def conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups):
    """relu(conv2d(input, weight, bias) [+ residual]) in the memory format conv_output_memory_format names
    (F.conv2d's own output may differ on CUDA: NCHW for float64, and for its non-cuDNN kernels)."""
    memory_format = conv_output_memory_format(input, weight)
    if onednn_may_crash_in_channels_last(input, stride, dilation):  # computed in NCHW instead
        # With NCHW's own strides: through size-1 dimensions an NCHW-contiguous tensor may carry
        # channels_last ones, which oneDNN follows.
        input = _with_canonical_strides(input, torch.contiguous_format)
        weight = _with_canonical_strides(weight, torch.contiguous_format)
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return _with_canonical_strides(torch.relu(out), memory_format)


def _with_canonical_strides(t, memory_format):
    """t laid out in memory_format with the strides torch.empty gives it, as the C++ op's output
    (output_strided_as in csrc/cpu/conv2d_relu.cpp says why .contiguous() alone is not that)."""
    t = t.contiguous(memory_format=memory_format)
    # mkldnn tensors (F.conv2d takes and keeps them) have no strides; compiled, the strides are
    # Inductor's to choose (and torch 2.11's dynamo cannot trace make_contiguous_strides_for).
    if t.layout != torch.strided or torch.compiler.is_compiling():
        return t
    if memory_format == torch.channels_last:
        canonical = torch._prims_common.make_channels_last_strides_for(t.shape)
    else:
        canonical = torch._prims_common.make_contiguous_strides_for(t.shape)
    if t.stride() == tuple(canonical):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format).copy_(t)


def add_relu(input, other):
    return torch.relu(input + other)
