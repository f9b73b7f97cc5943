"""VGG 11/13/16/19, with and without BatchNorm, with torchvision's layout and state_dict keys."""
import torch
import torch.nn as nn

from ._layers import ConvSequential, load_weights, num_classes_of

__all__ = ["VGG", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# Output channels of each 3×3 conv, "M" for a 2×2 max pool (configurations A, B, D, E of the paper).
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def make_features(config, batch_norm: bool) -> ConvSequential:
    layers = []
    in_channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return ConvSequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(config: str, batch_norm: bool, weights, progress: bool, kwargs) -> VGG:
    if weights is not None:
        kwargs["init_weights"] = False
    model = VGG(make_features(CONFIGS[config], batch_norm), **num_classes_of(weights, kwargs))
    return load_weights(model, weights, progress)


_DOC = """VGG-{depth}{bn}; kwargs: num_classes, init_weights, dropout.

    weights: a state_dict, a path to one, or a torchvision weights enum.
    """


def vgg11(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg11", False, weights, progress, kwargs)


def vgg11_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg11", True, weights, progress, kwargs)


def vgg13(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg13", False, weights, progress, kwargs)


def vgg13_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg13", True, weights, progress, kwargs)


def vgg16(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg16", False, weights, progress, kwargs)


def vgg16_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg16", True, weights, progress, kwargs)


def vgg19(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg19", False, weights, progress, kwargs)


def vgg19_bn(*, weights=None, progress: bool = True, **kwargs) -> VGG:
    return _vgg("vgg19", True, weights, progress, kwargs)


for _f in (vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn):
    _f.__doc__ = _DOC.format(depth=_f.__name__[3:5], bn=" with BatchNorm" if _f.__name__.endswith("_bn") else "")
