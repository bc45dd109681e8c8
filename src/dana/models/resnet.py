"""CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), §4.2.

Architecture (depth ``6n + 2``):

* a 3×3 conv (``in_channels`` → 16), BatchNorm, ReLU;
* three stages of ``n`` basic blocks each, with 16, 32 and 64 channels on feature maps of
  32×32, 16×16 and 8×8 (for a 32×32 input); the first block of stages 2 and 3 subsamples
  with stride 2;
* a basic block is conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU;
* global average pooling and a fully connected layer to ``num_classes`` logits.

That is ``6n`` weighted 3×3 conv layers, the first conv and the classifier: ``6n + 2``.

Shortcuts. The paper's CIFAR networks use option A (§4.2: "we use identity shortcuts in all
cases"): where a block halves the resolution and doubles the width, the shortcut subsamples the
input spatially (stride 2) and zero-pads the missing channels, so it has no parameters. With
option A the parameter counts for 10 classes and 3 input channels are:

====== ======== ==============
depth  n        parameters
====== ======== ==============
20     3        269,722 (0.27M)
32     5        464,154 (0.46M)
44     7        658,586 (0.66M)
56     9        853,018 (0.85M)
110    18       1,727,962 (1.7M)
====== ======== ==============

Option B (a 1×1 projection conv with BatchNorm on the two shape-changing shortcuts) is
available as ``shortcut="B"``; it adds 2,752 parameters (ResNet-20: 272,474, which rounds to
the same 0.27M).

Convolutions have no bias (BatchNorm follows each of them). Initialisation follows He et al.
(2015): Kaiming-normal for every conv (fan-out, ReLU gain) and the classifier weight (fan-in),
zero classifier bias, BatchNorm weight 1 and bias 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dana.errors import DanaError
from dana.models._init import init_weights

Shortcut = Literal["A", "B"]

STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


class ShortcutA(nn.Module):
    """Parameter-free shortcut (option A): stride-``stride`` subsampling and zero channel padding.

    The extra ``out_channels - in_channels`` channels are split evenly before and after the
    input channels, as in the reference CIFAR implementations.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise DanaError(
                f"option-A shortcut cannot shrink {in_channels} to {out_channels} channels; "
                "use more output channels"
            )
        self.stride = stride
        extra = out_channels - in_channels
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dimensions first: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU (He et al. 2016, Fig. 2)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: Shortcut = "A"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs (He et al. 2016, §4.2); see the module docstring.

    Args:
        depth: total number of weighted layers, ``6n + 2`` with ``n ≥ 1`` (20, 32, 44, 56, 110…).
        num_classes: number of output logits.
        in_channels: input image channels (3 for CIFAR, 1 for MNIST-like data).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (1×1 projection
            where the shape changes).

    Any input size works thanks to global average pooling; 28×28 inputs give 28/14/7 maps.
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Shortcut = "A",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise DanaError(
                f"ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        if shortcut not in ("A", "B"):
            raise DanaError(f"ResNet shortcut must be 'A' or 'B', got {shortcut!r}")
        self.depth = depth
        self.blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        width_in = STAGE_WIDTHS[0]
        for index, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(self.blocks_per_stage):
                # Only the first block of stages 2 and 3 subsamples (feature maps 32 → 16 → 8).
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(BasicBlock(width_in, width, stride, shortcut))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet(
    depth: int, *, num_classes: int = 10, in_channels: int = 3, shortcut: Shortcut = "A"
) -> CifarResNet:
    """Build a CIFAR ResNet-``depth`` (``depth = 6n + 2``); see :class:`CifarResNet`."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
