"""The networks the registry (:mod:`.archs`) builds from random weights: plain torch modules, one class each.

Why apart from :mod:`.models`: the registry's builders import these, and :mod:`.models` (the deployable wrapper)
imports the registry; here nothing of the package is imported, so the two never import each other.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedCNN(nn.Module):
    """The study report's network, layer for layer (Keras kernel: 'valid' 3x3 convs)."""

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
    field); four stride-2 stages keep the compute small enough for two CPU cores. Its default decode size and
    cell crop (a 160-pixel window around the cell at native resolution, sampled to 128x128) are in :mod:`.archs`.
    """

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
