"""Networks, each wrapped so that it takes what classify feeds: uint8 RGB, NHWC.

Normalisation and the layout change live inside the exported graph (:class:`Deployable`),
so an embedder in any language only decodes and resizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: ImageNet statistics are a poor fit for stained smears; these are the TRAIN set's own
#: per-channel mean/std (RGB, 0..1), measured once and fixed so runs stay comparable.
STAIN_MEAN = (0.678, 0.641, 0.660)
STAIN_STD = (0.260, 0.259, 0.257)


class SeedCNN(nn.Module):
    """The study report's network, layer for layer (Keras kernel: 'valid' 3x3 convs)."""

    default_size = (60, 80)

    def __init__(self, num_classes: int, size: tuple[int, int] = (60, 80)) -> None:
        super().__init__()
        h, w = size
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        )
        flat = 64 * ((h - 4) // 2) * ((w - 4) // 2)
        self.head = nn.Sequential(nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class WbcNet(nn.Module):
    """Default: a plain VGG-style stack with batch norm, stride-2 downsampling and global pooling.

    Global pooling makes the class decision position-invariant (the cell sits anywhere in the
    field); four stride-2 stages keep the compute small enough for two CPU cores.
    """

    default_size = (96, 128)

    def __init__(self, num_classes: int, size: tuple[int, int] = (96, 128), widths: tuple[int, ...] = (24, 48, 96, 160)) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.features = nn.Sequential(
            _conv_bn(3, w0, 2),
            _conv_bn(w0, w0), _conv_bn(w0, w1, 2),
            _conv_bn(w1, w1), _conv_bn(w1, w2, 2),
            _conv_bn(w2, w2), _conv_bn(w2, w3, 2),
            _conv_bn(w3, w3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(w3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS: dict[str, Callable[..., nn.Module]] = {"seed-cnn": SeedCNN, "wbc-net": WbcNet}
DEFAULT_ARCH = "wbc-net"


def build(arch: str, num_classes: int, size: tuple[int, int]) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](num_classes, size)


def default_size(arch: str) -> tuple[int, int]:
    return ARCHS[arch].default_size  # type: ignore[attr-defined]


class Deployable(nn.Module):
    """uint8 NHWC RGB in; normalised NCHW float to the network; logits or probabilities out."""

    def __init__(self, net: nn.Module, probabilities: bool = True, mean=STAIN_MEAN, std=STAIN_STD) -> None:
        super().__init__()
        self.net = net
        self.probabilities = probabilities
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).to(torch.float32) * self.scale - self.shift
        y = self.net(x)
        return torch.softmax(y, dim=1) if self.probabilities else y
