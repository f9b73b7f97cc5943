"""The layers the benchmark times, kept as data: every unique conv layer of LeNet-5, AlexNet,
VGG-16 and ResNet-50 (torchvision's definitions, 224x224 inputs; LeNet-5 on 1x32x32) with how
often it occurs, and the add+ReLU shapes at ResNet-50's block outputs.

A layer's epilogue is the one the fused model runs: bias + ReLU, or bias + residual + ReLU for
the last conv of a ResNet bottleneck. ResNet-50's downsample convs have no ReLU in the model;
they are timed with the ReLU epilogue, since their geometry is what they add.
"""
from dataclasses import dataclass

MODEL_INPUTS = {  # (channels, height, width) of one image
    "lenet5": (1, 32, 32),
    "alexnet": (3, 224, 224),
    "vgg16": (3, 224, 224),
    "resnet50": (3, 224, 224),
}


@dataclass(frozen=True)
class ConvLayer:
    model: str
    name: str  # the first module of that shape in the model
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    height: int  # input height and width
    width: int
    count: int  # how many convs of the model have this shape and epilogue
    residual: bool = False  # conv2d_add_relu instead of conv2d_relu
    dilation: int = 1
    groups: int = 1
    relu_in_model: bool = True

    op = property(lambda self: "conv2d_add_relu" if self.residual else "conv2d_relu")

    @property
    def out_hw(self):
        def size(n):
            return (n + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1
        return size(self.height), size(self.width)

    @property
    def label(self):
        stride = f" s{self.stride}" if self.stride > 1 else ""
        res = " +res" if self.residual else ""
        ds = " (ds)" if not self.relu_in_model else ""
        return (f"{self.model} {self.in_channels}>{self.out_channels} {self.kernel}x{self.kernel}{stride} "
                f"@{self.height}{res}{ds}")

    def input_shape(self, batch):
        return (batch, self.in_channels, self.height, self.width)

    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    def output_shape(self, batch):
        return (batch, self.out_channels, *self.out_hw)

    def flops(self, batch):
        oh, ow = self.out_hw
        macs = batch * oh * ow * self.out_channels * (self.in_channels // self.groups) * self.kernel ** 2
        return 2 * macs

    def min_bytes(self, batch, elem_size):
        """Input, weight, bias (and residual) read once, output written once."""
        out = _numel(self.output_shape(batch))
        elems = (_numel(self.input_shape(batch)) + _numel(self.weight_shape()) + self.out_channels
                 + out * (2 if self.residual else 1))
        return elems * elem_size


@dataclass(frozen=True)
class AddReluShape:
    model: str
    name: str
    channels: int
    height: int
    width: int
    count: int

    op = "add_relu"

    @property
    def label(self):
        return f"{self.model} add_relu {self.channels}x{self.height}x{self.width}"

    def input_shape(self, batch):
        return (batch, self.channels, self.height, self.width)

    def flops(self, batch):
        return 2 * _numel(self.input_shape(batch))  # one add and one max per element

    def min_bytes(self, batch, elem_size):
        return 3 * _numel(self.input_shape(batch)) * elem_size


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _conv(model, name, c, k, kernel, hw, count, stride=1, padding=None, residual=False, relu_in_model=True):
    if padding is None:
        padding = kernel // 2
    return ConvLayer(model, name, c, k, kernel, stride, padding, hw, hw, count, residual=residual,
                     relu_in_model=relu_in_model)


LENET5 = (
    _conv("lenet5", "conv1", 1, 6, 5, 32, 1, padding=0),
    _conv("lenet5", "conv2", 6, 16, 5, 14, 1, padding=0),
)

ALEXNET = (
    _conv("alexnet", "features.0", 3, 64, 11, 224, 1, stride=4, padding=2),
    _conv("alexnet", "features.3", 64, 192, 5, 27, 1),
    _conv("alexnet", "features.6", 192, 384, 3, 13, 1),
    _conv("alexnet", "features.8", 384, 256, 3, 13, 1),
    _conv("alexnet", "features.10", 256, 256, 3, 13, 1),
)

VGG16 = (
    _conv("vgg16", "features.0", 3, 64, 3, 224, 1),
    _conv("vgg16", "features.2", 64, 64, 3, 224, 1),
    _conv("vgg16", "features.5", 64, 128, 3, 112, 1),
    _conv("vgg16", "features.7", 128, 128, 3, 112, 1),
    _conv("vgg16", "features.10", 128, 256, 3, 56, 1),
    _conv("vgg16", "features.12", 256, 256, 3, 56, 2),
    _conv("vgg16", "features.17", 256, 512, 3, 28, 1),
    _conv("vgg16", "features.19", 512, 512, 3, 28, 2),
    _conv("vgg16", "features.24", 512, 512, 3, 14, 3),
)


def _bottleneck_stage(stage, c_in, width, blocks, stride, hw):
    """The unique convs of one ResNet-50 stage; block 0 changes channels (and size, by the stride
    of its 3x3 conv), blocks 1.. repeat one shape."""
    p, out, out_hw = f"layer{stage}", 4 * width, hw // stride
    layers = [
        _conv("resnet50", f"{p}.0.conv1", c_in, width, 1, hw, 1),
        # With stride 1 the 3x3 conv of block 0 has the shape of the later blocks' 3x3 convs.
        _conv("resnet50", f"{p}.0.conv2", width, width, 3, hw, blocks if stride == 1 else 1, stride=stride),
        _conv("resnet50", f"{p}.0.conv3", width, out, 1, out_hw, blocks, residual=True),
        _conv("resnet50", f"{p}.0.downsample.0", c_in, out, 1, hw, 1, stride=stride, relu_in_model=False),
        _conv("resnet50", f"{p}.1.conv1", out, width, 1, out_hw, blocks - 1),
    ]
    if stride > 1:
        layers.append(_conv("resnet50", f"{p}.1.conv2", width, width, 3, out_hw, blocks - 1))
    return layers


RESNET50 = (
    _conv("resnet50", "conv1", 3, 64, 7, 224, 1, stride=2, padding=3),
    *_bottleneck_stage(1, 64, 64, 3, 1, 56),
    *_bottleneck_stage(2, 256, 128, 4, 2, 56),
    *_bottleneck_stage(3, 512, 256, 6, 2, 28),
    *_bottleneck_stage(4, 1024, 512, 3, 2, 14),
)

RESNET50_ADD_RELU = tuple(
    AddReluShape("resnet50", f"layer{i}.*", c, hw, hw, n)
    for i, (c, hw, n) in enumerate(((256, 56, 3), (512, 28, 4), (1024, 14, 6), (2048, 7, 3)), 1)
)

LAYER_SETS = {
    "lenet5": LENET5,
    "alexnet": ALEXNET,
    "vgg16": VGG16,
    "resnet50": RESNET50,
    "add_relu": RESNET50_ADD_RELU,
}

# The small selection of --quick: cheap on two CPU cores, yet it covers both conv epilogues,
# a strided conv and add_relu.
QUICK_LAYERS = (
    LENET5[0],
    LENET5[1],
    next(l for l in RESNET50 if l.name == "layer4.0.conv3"),
    RESNET50_ADD_RELU[-1],
)


def model_conv_layers(model):
    """The conv layers of `model` (a LAYER_SETS key) as data."""
    return tuple(l for l in LAYER_SETS[model] if isinstance(l, ConvLayer))
