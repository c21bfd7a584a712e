"""A small configurable CNN: conv-BN-ReLU(-residual)-pool blocks, global pooling, dropout, linear head."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ResidualPair(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; with `drop_path` > 0 the branch is skipped per sample
    with that probability in training (stochastic depth, torchvision's StochasticDepth "row" mode)."""

    def __init__(self, channels: int, drop_path: float = 0.0):
        from torchvision.ops import StochasticDepth  # here, not with the package: torchvision takes seconds to load

        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.drop_path = StochasticDepth(drop_path, "row")  # p = 0: returns its input, draws nothing
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.drop_path(self.body(x)))


class SimpleCNN(nn.Module):
    """`features` (one block per entry of `channels`, each halving the resolution) then `head`."""

    def __init__(self, num_classes: int, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128),
                 residual: bool = False, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if drop_path and not residual:
            raise ValueError(f"model.drop_path={drop_path} needs model.residual=true: simple_cnn's stochastic depth "
                             "skips the residual pairs, and without them it has none")
        blocks: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            layers: list[nn.Module] = [conv_bn_relu(previous, width)]
            if residual:  # the skip probability rises linearly with depth, to drop_path at the deepest pair
                layers.append(ResidualPair(width, drop_path * (index + 1) / len(channels)))
            layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            previous = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
