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


class ChannelMix(nn.Module):
    """A custom layer holding a raw parameter: torch-pruning cannot follow channels through it."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) + 0.1 * torch.randn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,dc->ndhw", x, self.weight)


class CustomLayerCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = ChannelMix(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.mix(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


class TinyEncoder(nn.Module):
    """A two-layer BERT with four heads per layer: token ids and mask -> pooled (N, 32)."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32)
        config._attn_implementation = "eager"
        self.encoder = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.mean(1)


def tiny_encoder() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder().eval()


class TinyResNet(nn.Module):
    """A stem and two residual blocks (conv-bn-relu-conv-bn + skip): (N, 3, 16, 16) -> (N, 5)."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "conv1": nn.Conv2d(width, width, 3, padding=1), "bn1": nn.BatchNorm2d(width),
            "conv2": nn.Conv2d(width, width, 3, padding=1), "bn2": nn.BatchNorm2d(width)}) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = torch.relu(x + b["bn2"](b["conv2"](torch.relu(b["bn1"](b["conv1"](x))))))
        return self.head(x.mean((2, 3)))


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet().eval()


class TabularMLP(nn.Module):
    """Standardised tabular features -> class logits."""

    def __init__(self, features: int = 30, classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class LenBatch(nn.Module):
    """Uses ``len(x)`` in forward: torch.export turns the batch size into a constant."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x + self.token.expand(len(x), -1))
