"""Tiny models for fast tests; each builds and exports in seconds on two cores."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """(N, 3, 16, 16) -> (N, 5) logits."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class TwoInputs(nn.Module):
    """Two named float inputs -> one regression output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (self.a(left) * self.b(right)).sum(1, keepdim=True)


def tiny_cnn(width: int = 8) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(width).eval()


def calibration_batches():
    """A ``module:function`` calibration source: yields dicts of arrays."""
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(4):
        yield {"x": rng.standard_normal((8, 3, 16, 16)).astype("float32")}
