"""Model zoo for the DANA experiments, built by name with :func:`build_model`.

Names (case-insensitive):

* ``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``, ``"resnet110"`` and in
  general ``"resnet{6n+2}"``: the CIFAR ResNets of He et al. (2016, §4.2) with parameter-free
  option-A shortcuts (:mod:`dana.models.resnet`);
* ``"wrn-16-4"`` and in general ``"wrn-{d}-{k}"`` with ``(d - 4) % 6 == 0``: the Wide ResNets
  of Zagoruyko & Komodakis (2016), no dropout (:mod:`dana.models.wide_resnet`);
* ``"cnn"``: a small two-layer BatchNorm CNN for fast CPU runs on 28×28 grayscale images
  (:mod:`dana.models.cnn`);
* ``"lenet-300-100"`` and ``"lenet-300-100-bn"`` (with BatchNorm): a fully connected network
  with ResNet-20's parameter count, some 25 times cheaper per step than ``"cnn"`` on a CPU
  (:mod:`dana.models.mlp`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from dana.errors import DanaError
from dana.models.cnn import SmallCNN
from dana.models.mlp import LeNet300100
from dana.models.resnet import CifarResNet, resnet
from dana.models.wide_resnet import WideResNet, wide_resnet

#: The named models of the paper's experiments plus the quick CPU model. ``build_model`` also
#: accepts any ``resnet{6n+2}`` and ``wrn-{d}-{k}`` (see :data:`MODEL_PATTERNS`).
MODELS: tuple[str, ...] = (
    "cnn",
    "lenet-300-100",
    "lenet-300-100-bn",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "wrn-16-4",
)

#: The generic name patterns accepted besides :data:`MODELS`.
MODEL_PATTERNS: tuple[str, ...] = ("resnet{6n+2}", "wrn-{d}-{k} with (d-4)%6==0")

_RESNET = re.compile(r"resnet(\d+)")
_WRN = re.compile(r"wrn-(\d+)-(\d+)")

__all__ = [
    "MODELS",
    "MODEL_PATTERNS",
    "CifarResNet",
    "LeNet300100",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "model_builder",
    "resnet",
    "wide_resnet",
]


def _valid_names() -> str:
    return ", ".join(MODELS) + " or the patterns " + ", ".join(MODEL_PATTERNS)


def build_model(
    name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of :data:`MODELS` or a generic ``resnet{6n+2}`` / ``wrn-{d}-{k}`` name.
        num_classes: number of output logits (≥ 2).
        in_channels: input image channels (≥ 1): 3 for CIFAR, 1 for MNIST-like data.
        image_size: input height and width (32 for CIFAR, 28 for MNIST-like data); only the
            fully connected ``"lenet-300-100"`` depends on it.

    Returns:
        The model in training mode; its initial weights depend only on the torch RNG state, so
        the same ``torch.manual_seed`` gives the same model.

    Raises:
        DanaError: unknown or malformed name, or out-of-range ``num_classes`` / ``in_channels``.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise DanaError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise DanaError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DanaError(f"image_size must be an integer >= 1, got {image_size!r}")
    return model_builder(name)(num_classes, in_channels, image_size)


def model_builder(name: str) -> Callable[[int, int, int], nn.Module]:
    """``(num_classes, in_channels, image_size) -> model`` for a model name; a one-line
    :class:`DanaError` for an unknown or malformed one (checked without building)."""
    if not isinstance(name, str):
        raise DanaError(f"model name must be a string; use one of {_valid_names()}")
    key = name.strip().lower()

    if key == "cnn":
        return lambda classes, channels, size: SmallCNN(num_classes=classes, in_channels=channels)
    if key in ("lenet-300-100", "lenet-300-100-bn"):
        return lambda classes, channels, size: LeNet300100(
            num_classes=classes,
            in_channels=channels,
            image_size=size,
            batch_norm=key.endswith("-bn"),
        )
    if match := _RESNET.fullmatch(key):
        depth = int(match.group(1))
        if depth < 8 or (depth - 2) % 6 != 0:
            raise DanaError(
                f"unknown model {name!r}: ResNet depth must be 6n+2 (20, 32, 44, 56, 110); "
                f"use one of {_valid_names()}"
            )
        return lambda classes, channels, size: resnet(
            depth, num_classes=classes, in_channels=channels
        )
    if match := _WRN.fullmatch(key):
        depth, width = int(match.group(1)), int(match.group(2))
        if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
            raise DanaError(
                f"unknown model {name!r}: WRN-d-k needs (d-4)%6==0, d>=10 and k>=1; "
                f"use one of {_valid_names()}"
            )
        return lambda classes, channels, size: wide_resnet(
            depth, width, num_classes=classes, in_channels=channels
        )
    raise DanaError(f"unknown model {name!r}; use one of {_valid_names()}")
