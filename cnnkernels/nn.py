"""nn.Module forms of the fused ops."""
import torch.nn as nn
import torch.nn.functional as F

from . import functional


class Conv2dReLU(nn.Conv2d):
    """nn.Conv2d followed by ReLU, in one fused op. Same constructor and state_dict as nn.Conv2d."""

    def forward(self, input):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return functional.conv2d_relu(input, self.weight, self.bias, self.stride, 0, self.dilation,
                                          self.groups)
        return functional.conv2d_relu(input, self.weight, self.bias, self.stride, self.padding,
                                      self.dilation, self.groups)


class AddReLU(nn.Module):
    """relu(input + other) in one pass: the end of a residual block."""

    def forward(self, input, other):
        return functional.add_relu(input, other)
