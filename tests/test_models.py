"""Tests for the model zoo: parameter counts against the papers, shapes, gradients, names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dana.errors import DanaError
from dana.models import MODELS, build_model
from dana.models.resnet import CifarResNet, ShortcutA


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- parameter counts -------------------------------------------------------------------------


def test_resnet20_exact_count_option_a() -> None:
    # Option A (the paper's CIFAR choice) has parameter-free shortcuts.
    assert n_params(build_model("resnet20", num_classes=10)) == 269_722


def test_resnet20_exact_count_option_b() -> None:
    # Option B adds two 1×1 projections with BatchNorm: 16·32 + 2·32 + 32·64 + 2·64 = 2,752.
    assert n_params(CifarResNet(20, num_classes=10, shortcut="B")) == 272_474


@pytest.mark.parametrize(
    ("name", "millions", "digits"),
    [
        ("resnet20", 0.27, 2),
        ("resnet32", 0.46, 2),
        ("resnet44", 0.66, 2),
        ("resnet56", 0.85, 2),
        ("resnet110", 1.7, 1),
    ],
)
def test_resnet_counts_match_paper_table(name: str, millions: float, digits: int) -> None:
    # He et al. 2016, Table 6 (CIFAR-10), rounded as printed there.
    assert round(n_params(build_model(name, num_classes=10)) / 1e6, digits) == millions


def resnet_formula(n: int, num_classes: int, in_channels: int = 3) -> int:
    """Option-A ResNet-(6n+2) count written out from the architecture."""
    total = in_channels * 16 * 9 + 2 * 16  # conv1 + bn1
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += c_in * width * 9 + 2 * width + width * width * 9 + 2 * width
            c_in = width
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("n", [1, 3, 5, 7, 9, 18])
def test_resnet_counts_match_formula(n: int) -> None:
    model = build_model(f"resnet{6 * n + 2}", num_classes=100, in_channels=1)
    assert n_params(model) == resnet_formula(n, 100, in_channels=1)


def wrn_16_4_formula(num_classes: int, in_channels: int = 3) -> int:
    """WRN-16-4 written out layer by layer: n = 2 blocks per group, widths 16, 64, 128, 256."""

    def conv(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k  # no bias: BatchNorm follows

    def bn(c: int) -> int:
        return 2 * c  # weight and bias (running stats are buffers)

    total = conv(in_channels, 16, 3)
    # group 1: 16 → 64 (1×1 shortcut in block 1), then 64 → 64
    total += bn(16) + conv(16, 64, 3) + bn(64) + conv(64, 64, 3) + conv(16, 64, 1)
    total += bn(64) + conv(64, 64, 3) + bn(64) + conv(64, 64, 3)
    # group 2: 64 → 128, stride 2
    total += bn(64) + conv(64, 128, 3) + bn(128) + conv(128, 128, 3) + conv(64, 128, 1)
    total += bn(128) + conv(128, 128, 3) + bn(128) + conv(128, 128, 3)
    # group 3: 128 → 256, stride 2
    total += bn(128) + conv(128, 256, 3) + bn(256) + conv(256, 256, 3) + conv(128, 256, 1)
    total += bn(256) + conv(256, 256, 3) + bn(256) + conv(256, 256, 3)
    # final BN-ReLU-pool, then the classifier with bias
    total += bn(256) + 256 * num_classes + num_classes
    return total


@pytest.mark.parametrize("num_classes", [10, 100])
def test_wrn_16_4_count(num_classes: int) -> None:
    model = build_model("wrn-16-4", num_classes=num_classes)
    assert n_params(model) == wrn_16_4_formula(num_classes)


def test_wrn_16_4_matches_paper() -> None:
    # Zagoruyko & Komodakis 2016, Table 2: WRN-16-4 has 2.7M parameters.
    assert round(n_params(build_model("wrn-16-4", num_classes=10)) / 1e6, 1) == 2.7


def test_option_a_shortcut_has_no_parameters() -> None:
    model = build_model("resnet20", num_classes=10)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # first block of stages 2 and 3
    for shortcut in shortcuts:
        assert sum(p.numel() for p in shortcut.parameters()) == 0
    x = torch.randn(2, 16, 8, 8)
    out = shortcuts[0](x)
    assert out.shape == (2, 32, 4, 4)
    # subsampled input in the middle channels, zeros elsewhere
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


# --- shapes and gradients ---------------------------------------------------------------------

SMALL_ZOO = ["cnn", "resnet20", "resnet32", "wrn-10-1", "wrn-16-4"]


@pytest.mark.parametrize("name", SMALL_ZOO)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_output_shape(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)


@pytest.mark.parametrize("name", ["cnn", "resnet20", "wrn-16-4"])
def test_forward_backward_gives_finite_grads(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_every_model_but_plain_lenet_has_batchnorm() -> None:
    # The simulator's BatchNorm policy must be exercised by every model, the quick ones
    # included; plain LeNet-300-100 is the one model without, on purpose.
    for name in MODELS:
        if name in ("resnet56", "resnet110"):
            continue  # same family as resnet20; skip for speed
        model = build_model(name, num_classes=10)
        has_bn = any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
        assert has_bn == (name != "lenet-300-100"), name


def test_lenet_300_100_counts_and_shapes() -> None:
    # 784·300+300 + 300·100+100 + 100·10+10 = 266,610; BatchNorm adds 2·(300+100).
    assert n_params(build_model("lenet-300-100", num_classes=10, in_channels=1, image_size=28)) == (
        266_610
    )
    bn = build_model("lenet-300-100-bn", num_classes=10, in_channels=1, image_size=28)
    assert n_params(bn) == 266_610 + 800
    cifar = build_model("lenet-300-100", num_classes=100)  # 3×32×32 by default
    assert n_params(cifar) == 3072 * 300 + 300 + 30_100 + 100 * 100 + 100
    bn.eval()
    with torch.no_grad():
        assert bn(torch.randn(5, 1, 28, 28)).shape == (5, 10)
        with pytest.raises(DanaError, match=r"shape \(1, 28, 28\), got \(3, 32, 32\)"):
            bn(torch.randn(5, 3, 32, 32))
    with pytest.raises(DanaError, match="image_size"):
        build_model("lenet-300-100", num_classes=10, image_size=0)


# --- names and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_all_listed_names_build(name: str) -> None:
    assert isinstance(build_model(name, num_classes=10), nn.Module)


def test_names_are_case_insensitive() -> None:
    assert n_params(build_model("ResNet20", num_classes=10)) == 269_722


@pytest.mark.parametrize(
    "name",
    ["resnet", "resnet21", "resnet2", "resnet-20", "wrn-15-4", "wrn-16-0", "wrn-16", "vgg16", ""],
)
def test_unknown_names_raise(name: str) -> None:
    with pytest.raises(DanaError) as info:
        build_model(name, num_classes=10)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet20" in message and "wrn-16-4" in message


@pytest.mark.parametrize(("num_classes", "in_channels"), [(1, 3), (0, 3), (10, 0), (10, -1)])
def test_bad_sizes_raise(num_classes: int, in_channels: int) -> None:
    with pytest.raises(DanaError):
        build_model("cnn", num_classes=num_classes, in_channels=in_channels)


def test_wrn_bad_depth_raises_directly() -> None:
    from dana.models.wide_resnet import WideResNet

    with pytest.raises(DanaError, match="d - 4"):
        WideResNet(17, 2)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet20", "wrn-10-2"])
def test_same_seed_same_model(name: str) -> None:
    torch.manual_seed(123)
    a = build_model(name, num_classes=10)
    torch.manual_seed(123)
    b = build_model(name, num_classes=10)
    torch.manual_seed(124)
    c = build_model(name, num_classes=10)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
