"""Weight initialisation shared by the model families."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """He et al. (2015) initialisation, as in the reference Torch ResNet / WRN code.

    Conv weights: Kaiming-normal with fan-out and ReLU gain (std ``sqrt(2 / (k·k·C_out))``);
    linear weights: Kaiming-normal with fan-in; every bias 0; BatchNorm weight 1, bias 0.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
