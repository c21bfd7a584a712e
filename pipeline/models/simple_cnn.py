"""A small configurable CNN: conv-BN-ReLU(-residual)-pool blocks, global pooling, dropout, linear head."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ResidualPair(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SimpleCNN(nn.Module):
    """`features` (one block per entry of `channels`, each halving the resolution) then `head`."""

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128),
                 residual: bool = False, dropout: float = 0.0):
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers: list[nn.Module] = [conv_bn_relu(previous, width)]
            if residual:
                layers.append(ResidualPair(width))
            layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            previous = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
