"""ResNet, ResNeXt and Wide ResNet with torchvision's layout and state_dict keys (ResNet v1.5: the
stride sits on the bottleneck's 3×3 conv). Each block ends in add_relu (train) or conv2d_add_relu (eval).
"""
from typing import Optional, Union

import torch
import torch.nn as nn

from ._layers import ConvSequential, DropsFoldsOnModeSwitch, conv_unit, load_weights, num_classes_of

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(DropsFoldsOnModeSwitch, nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_unit(x, self.conv1, self.bn1, self.relu)
        identity = x if self.downsample is None else self.downsample(x)
        return conv_unit(out, self.conv2, self.bn2, self.relu, residual=identity)


class Bottleneck(DropsFoldsOnModeSwitch, nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_unit(x, self.conv1, self.bn1, self.relu)
        out = conv_unit(out, self.conv2, self.bn2, self.relu)
        identity = x if self.downsample is None else self.downsample(x)
        return conv_unit(out, self.conv3, self.bn3, self.relu, residual=identity)


class ResNet(DropsFoldsOnModeSwitch, nn.Module):
    def __init__(self, block: type[Union[BasicBlock, Bottleneck]], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list[bool]] = None) -> None:
        super().__init__()
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            # Each block then starts as the identity, which helps training (arXiv:1706.02677).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvSequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_unit(x, self.conv1, self.bn1, self.relu)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _resnet(block, layers, weights, progress, kwargs) -> ResNet:
    model = ResNet(block, layers, **num_classes_of(weights, kwargs))
    return load_weights(model, weights, progress)


_DOC = """{title}; kwargs: num_classes, zero_init_residual, groups, width_per_group,
    replace_stride_with_dilation (as torchvision's).

    weights: a state_dict, a path to one, or a torchvision weights enum.
    """


def resnet18(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, progress, kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, progress, kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, progress, kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    kwargs.update(groups=32, width_per_group=4)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    kwargs.update(groups=32, width_per_group=8)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, kwargs)


def resnext101_64x4d(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    kwargs.update(groups=64, width_per_group=4)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    kwargs.update(width_per_group=64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, progress, kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    kwargs.update(width_per_group=64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, progress, kwargs)


for _f, _title in ((resnet18, "ResNet-18"), (resnet34, "ResNet-34"), (resnet50, "ResNet-50"),
                   (resnet101, "ResNet-101"), (resnet152, "ResNet-152"), (resnext50_32x4d, "ResNeXt-50 32×4d"),
                   (resnext101_32x8d, "ResNeXt-101 32×8d"), (resnext101_64x4d, "ResNeXt-101 64×4d"),
                   (wide_resnet50_2, "Wide ResNet-50-2"), (wide_resnet101_2, "Wide ResNet-101-2")):
    _f.__doc__ = _DOC.format(title=_title)
