"""The zoo's architectures: tiny models of different families (see ``models.zoo``).

Each factory (``efficientnet``, ``convnext``, ...) is what ``--arch models.zoo:<factory>`` names.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 2048
MAX_TOKENS = 32


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expansion, depthwise 3x3, squeeze-excitation, 1x1 projection."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1, activation: type = nn.SiLU):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), activation())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), activation())
        self.se = SqueezeExcite(hidden, max(4, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class EfficientNetTiny(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16), MBConv(16, 24, stride=2), MBConv(24, 24))
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (ConvNeXt's downsampling norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, 4 * channels)
        self.down = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)
        y = self.down(nn.functional.gelu(self.up(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 2, stride=2), ChannelsLayerNorm(24))
        self.blocks = nn.Sequential(ConvNeXtBlock(24), ConvNeXtBlock(24))
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """A vision transformer: 2x2 patches of an 8x8 image, a class token, two attention blocks."""

    def __init__(self, classes: int = 10, dim: int = 32, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList([AttentionBlock(dim, heads) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))


class BertTiny(nn.Module):
    """A BERT-style encoder on token ids and an attention mask, mean-pooled, with a classifier."""

    def __init__(self, classes: int = 8, dim: int = 48, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.position = nn.Embedding(MAX_TOKENS, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList([AttentionBlock(dim, heads) for _ in range(2)])
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.position(positions))
        padding = attention_mask == 0
        for block in self.blocks:
            x = block(x, padding)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class RecurrentTiny(nn.Module):
    """Digit rows as a sequence of 8 steps of 8 values, through an LSTM or a GRU."""

    def __init__(self, cell: str = "lstm", classes: int = 10, hidden: int = 48):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class SignalCNN(nn.Module):
    """A 1-D convolution over a signal (a digit read row by row: 64 samples)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(2))


class TabularMLP(nn.Module):
    def __init__(self, features: int = 13, outputs: int = 3, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TwoInTwoOut(nn.Module):
    """Two inputs (two groups of features) and two outputs (class logits and a regressed value)."""

    def __init__(self, first: int = 10, second: int = 19, hidden: int = 32):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(first, hidden), nn.ReLU())
        self.right = nn.Sequential(nn.Linear(second, hidden), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU())
        self.classes = nn.Linear(hidden, 2)
        self.value = nn.Linear(hidden, 1)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.trunk(torch.cat([self.left(left), self.right(right)], 1))
        return self.classes(shared), self.value(shared)


class DenseSegmenter(nn.Module):
    """Per-pixel classes (digit foreground or background): a small encoder-decoder."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.out = nn.Conv2d(32, classes, 1)
        self.skip = nn.Conv2d(1, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([torch.relu(self.up(self.down(x))), torch.relu(self.skip(x))], 1))


def efficientnet() -> nn.Module:
    return EfficientNetTiny()


def convnext() -> nn.Module:
    return ConvNeXtTiny()


def vit() -> nn.Module:
    return ViTTiny()


def bert() -> nn.Module:
    return BertTiny()


def lstm() -> nn.Module:
    return RecurrentTiny("lstm")


def gru() -> nn.Module:
    return RecurrentTiny("gru")


def signal_cnn() -> nn.Module:
    return SignalCNN()


def tabular_classifier() -> nn.Module:
    return TabularMLP(13, 3)


def tabular_regressor() -> nn.Module:
    return TabularMLP(10, 1)


def two_in_two_out() -> nn.Module:
    return TwoInTwoOut()


def segmenter() -> nn.Module:
    return DenseSegmenter()
