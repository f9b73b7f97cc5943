"""LeNet-5 (LeCun et al., 1998) in its common modern form: ReLU and max pooling, 1×32×32 input."""
import torch
import torch.nn as nn

from ._layers import ConvSequential, load_weights

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = ConvSequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def lenet5(*, weights=None, progress: bool = True, **kwargs) -> LeNet5:
    """LeNet-5: convs of 6 and 16 channels (5×5), FCs of 120, 84 and num_classes (default 10).

    kwargs: num_classes, in_channels. weights: a state_dict or a path to one.
    """
    return load_weights(LeNet5(**kwargs), weights, progress)
