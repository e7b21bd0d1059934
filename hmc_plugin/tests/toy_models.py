"""Small models the planning tests share."""
from __future__ import annotations

from torch import nn


class Chain(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks of 32 channels and a classifier: four pruning groups, four decomposable convs."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 32, 32, 32]
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU())
                                    for a, b in zip(widths, widths[1:]))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))
