"""Three CNNs in shapes the zoo's tests never see, built from the zoo's pieces, for measuring
pruning and recovery on models the tool was not tuned on (``benchmarks/prune_unseen.py``).

- ``mbconv_gelu``: depthwise-separable MBConv blocks with squeeze-excitation, GELU, wider and deeper
  than the zoo's EfficientNet, an expansion of 3 and 6.
- ``bottleneck_resnet``: ResNet bottleneck blocks (1x1, 3x3, 1x1, BatchNorm, ReLU) with projection
  shortcuts.
- ``convnext_two_stage``: ConvNeXt blocks in two stages with a LayerNorm + strided-conv downsampling.

Each is what ``--arch models.unseen:<factory>`` names; they take digits as 1x8x8 images.
"""

from __future__ import annotations

import torch
from torch import nn

from models.zoo_nets import ChannelsLayerNorm, ConvNeXtBlock, MBConv


class MBConvGelu(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.GELU())
        self.blocks = nn.Sequential(MBConv(24, 24, 3, activation=nn.GELU), MBConv(24, 40, 6, 2, nn.GELU),
                                    MBConv(40, 40, 3, activation=nn.GELU), MBConv(40, 64, 6, 2, nn.GELU))
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(Bottleneck(32, 16, 64), Bottleneck(64, 16, 64), Bottleneck(64, 32, 128, 2),
                                    Bottleneck(128, 32, 128))
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class ConvNeXtTwoStage(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 1), ChannelsLayerNorm(32))
        self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.down = nn.Sequential(ChannelsLayerNorm(32), nn.Conv2d(32, 48, 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(48), ConvNeXtBlock(48))
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(y.mean((2, 3))))


def mbconv_gelu() -> nn.Module:
    return MBConvGelu()


def bottleneck_resnet() -> nn.Module:
    return BottleneckResNet()


def convnext_two_stage() -> nn.Module:
    return ConvNeXtTwoStage()


FACTORIES = {"mbconv_gelu": mbconv_gelu, "bottleneck_resnet": bottleneck_resnet,
             "convnext_two_stage": convnext_two_stage}
