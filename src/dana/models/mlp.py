"""LeNet-300-100: a fully connected network for fast CPU experiments on 28×28 images.

Architecture (LeCun et al., 1998), with optional BatchNorm after each hidden linear layer::

    flatten (C·H·W) - linear → 300 [- BN] - ReLU - linear → 100 [- BN] - ReLU - linear → classes

266,610 parameters for 1 input channel, 28×28 images and 10 classes (BatchNorm adds 800),
about as many as ResNet-20 (0.27M), so messages, velocities and the parameter server move
the same amount of data as in the paper's main experiment. A training step at batch 128
takes a few ms on one CPU thread, some 25 times less than :class:`~dana.models.cnn.SmallCNN`,
which is what lets the reduced protocol (docs/experiments.md) train on all 60,000
Fashion-MNIST images for 20 epochs. The reduced protocol uses the BatchNorm variant, as the
paper's networks have BatchNorm: without it, pilot runs at the single-worker lr diverged
with 16 asynchronous workers even for DANA.
"""

from __future__ import annotations

import torch
from torch import nn

from dana.errors import DanaError
from dana.models._init import init_weights


class LeNet300100(nn.Module):
    """Two ReLU hidden layers on the flattened image; see the module docstring.

    Args:
        num_classes: number of output logits.
        in_channels: input image channels (1 for MNIST-like data, 3 for CIFAR).
        image_size: input height and width (28 for MNIST-like data, 32 for CIFAR).
        hidden: widths of the two hidden layers.
        batch_norm: BatchNorm after each hidden linear layer (``"lenet-300-100-bn"``).
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: tuple[int, int] = (300, 100),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(hidden) != 2 or min(hidden) < 1:
            raise DanaError(f"hidden widths must be two positive integers, got {hidden!r}")
        h1, h2 = hidden
        self.image_shape = (in_channels, image_size, image_size)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.bn1 = nn.BatchNorm1d(h1) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm1d(h2) if batch_norm else nn.Identity()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise DanaError(
                f"LeNet-300-100 was built for images of shape {self.image_shape}, got "
                f"{tuple(x.shape[1:])}: build it with the dataset's in_channels and image size"
            )
        out = torch.relu(self.bn1(self.fc1(torch.flatten(x, 1))))
        out = torch.relu(self.bn2(self.fc2(out)))
        return self.fc3(out)
