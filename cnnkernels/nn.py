"""nn.Module forms of the fused ops."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional


def _input_and_padding(conv, input):
    """nn.Conv2d's non-zero padding modes pad the input explicitly, then convolve unpadded."""
    if conv.padding_mode != "zeros":
        return F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    return input, conv.padding


def _output_shape(conv, input_shape):
    *batch, _, h, w = input_shape
    if conv.padding == "same":
        return (*batch, conv.out_channels, h, w)
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (*batch, conv.out_channels, *size)


class Conv2dReLU(nn.Conv2d):
    """nn.Conv2d followed by ReLU, in one fused op. Same constructor and state_dict as nn.Conv2d."""

    def forward(self, input):
        input, padding = _input_and_padding(self, input)
        return functional.conv2d_relu(input, self.weight, self.bias, self.stride, padding, self.dilation,
                                      self.groups)


class Conv2dAddReLU(nn.Conv2d):
    """nn.Conv2d whose forward(input, residual) is relu(conv2d(input) + residual), in one op.

    A residual that would broadcast, or that has another dtype outside autocast, takes the
    unfused path, so the result always equals relu(conv(input) + residual).
    """

    def forward(self, input, residual):
        if (not isinstance(residual, torch.Tensor) or residual.shape != _output_shape(self, input.shape)
                or (residual.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type))):
            return torch.relu(self._conv_forward(input, self.weight, self.bias) + residual)
        input, padding = _input_and_padding(self, input)
        return functional.conv2d_add_relu(input, self.weight, residual, self.bias, self.stride, padding,
                                          self.dilation, self.groups)


class AddReLU(nn.Module):
    """relu(input + other) in one pass: the end of a residual block."""

    def forward(self, input, other):
        return functional.add_relu(input, other)
