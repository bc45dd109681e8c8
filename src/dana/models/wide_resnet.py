"""Wide ResNets WRN-d-k of Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

Architecture (Table 1 of the paper, CIFAR variant, ``n = (d - 4) / 6`` blocks per group):

* conv1: 3×3 conv, ``in_channels`` → 16;
* conv2: ``n`` blocks of width ``16k`` on 32×32 maps (stride 1);
* conv3: ``n`` blocks of width ``32k`` on 16×16 maps (first block stride 2);
* conv4: ``n`` blocks of width ``64k`` on 8×8 maps (first block stride 2);
* BN-ReLU, global average pooling, fully connected layer to ``num_classes`` logits.

Each block is the pre-activation "B(3,3)" block: BN-ReLU-conv3×3-[dropout]-BN-ReLU-conv3×3,
added to the shortcut. The shortcut is the identity when the shape is unchanged, otherwise a
1×1 conv (with the block's stride) applied to the block's first BN-ReLU output, as in the
authors' code. Convolutions have no bias. Dropout (``dropout``, default 0) sits between the two
convolutions of every block (§2.4 of the paper).

The depth follows the paper's naming ``d = 6n + 4`` (WRN-16-k: n = 2; WRN-28-k: n = 4).
WRN-16-4 has 2,748,890 parameters for 10 classes (2.7M in the paper) and 2,772,020 for 100;
WRN-28-10 has 36,479,194 (36.5M in the paper).

Initialisation: Kaiming-normal convs (fan-out) and classifier (fan-in), zero biases, BatchNorm
weight 1 and bias 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dana.errors import DanaError
from dana.models._init import init_weights


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-dropout-BN-ReLU-conv3×3 plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input (authors' code): the block's
        # BN-ReLU is shared, so the un-normalised input never bypasses BatchNorm.
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``width``; see the module docstring.

    Args:
        depth: ``d`` with ``(d - 4) % 6 == 0`` and ``d ≥ 10`` (10, 16, 22, 28, 40…).
        width: widening factor ``k ≥ 1``.
        num_classes: number of output logits.
        in_channels: input image channels (3 for CIFAR, 1 for MNIST-like data).
        dropout: dropout probability between the two convs of each block, in ``[0, 1)``.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise DanaError(
                f"WRN depth must satisfy (d - 4) % 6 == 0 with d >= 10 (10, 16, 22, 28, 40), "
                f"got {depth}"
            )
        if width < 1:
            raise DanaError(f"WRN widening factor k must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise DanaError(f"WRN dropout must be in [0, 1), got {dropout}")
        self.depth = depth
        self.width = width
        self.blocks_per_group = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for index in range(3):
            blocks = []
            for b in range(self.blocks_per_group):
                # Only the first block of groups conv3 and conv4 subsamples.
                stride = 2 if index > 0 and b == 0 else 1
                width_in = widths[index] if b == 0 else widths[index + 1]
                blocks.append(WideBasicBlock(width_in, widths[index + 1], stride, dropout))
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wide_resnet(
    depth: int,
    width: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    dropout: float = 0.0,
) -> WideResNet:
    """Build WRN-``depth``-``width``; see :class:`WideResNet`."""
    return WideResNet(
        depth, width, num_classes=num_classes, in_channels=in_channels, dropout=dropout
    )
