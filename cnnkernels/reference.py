"""The plain-PyTorch implementations: the "torch" backend and the tests' reference."""
import torch
import torch.nn.functional as F

from ._args import conv_output_memory_format


def conv2d_bias_act(input, weight, bias, residual, stride, padding, dilation, groups):
    """relu(conv2d(input, weight, bias) [+ residual]) in the memory format conv_output_memory_format names
    (F.conv2d's own output may differ on CUDA: NCHW for float64, and for its non-cuDNN kernels)."""
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out).contiguous(memory_format=conv_output_memory_format(input, weight))


def add_relu(input, other):
    return torch.relu(input + other)
