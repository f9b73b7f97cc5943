"""Classic CNNs built from cnnkernels' fused ops, with torchvision's constructors and state_dict keys.

In train mode the models run conv → BN → ReLU with BatchNorm untouched, conv2d_relu where no BN
sits in between and add_relu at each residual block's end. In eval mode each BN is folded into its
conv (cached, refolded when a weight or statistic changes), so every conv is one conv2d_relu,
conv2d_add_relu or plain conv call. Outputs match torchvision's with the same weights.
"""
from ._layers import reference_mode
from .alexnet import AlexNet, alexnet
from .lenet import LeNet5, lenet5
from .resnet import (BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152,
                     resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
from .summary import LayerRow, ModelSummary, conv_layers, summary
from .vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = [
    "lenet5", "alexnet",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "LeNet5", "AlexNet", "VGG", "ResNet", "BasicBlock", "Bottleneck",
    "summary", "conv_layers", "ModelSummary", "LayerRow", "reference_mode",
]
