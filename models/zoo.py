"""A zoo of tiny models of different families, each trained for seconds on real data that ships in
packages, each with what it must satisfy.

Every ``ZooModel`` names its architecture (``models.zoo:<factory>``, what ``--arch`` takes), its
data (scikit-learn's digits, wine, breast cancer and diabetes sets; the standard library's
docstrings; digit rows as a sequence, digits as a 1-D signal, digit foreground masks as per-pixel
labels), the FP32 quality it must reach on its test split, and the ONNX operations its exported
graph must contain, so that a zoo model cannot quietly become a simpler one.

    python -m models.zoo OUT_DIR [NAME ...]   # train and write OUT_DIR/NAME/{model.pt,calib.npz,eval.npz,zoo.json}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

SEED = 0
TEST_SHARE = 0.3


# --- architectures -------------------------------------------------------------------------------

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

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.SiLU())
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


VOCAB = 2048
MAX_TOKENS = 32


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


# --- data ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ZooData:
    """Inputs by name and targets (class indices, values, or per-pixel classes), train and test."""

    train: dict[str, np.ndarray]
    train_y: np.ndarray
    test: dict[str, np.ndarray]
    test_y: np.ndarray


def _split(count: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SEED).permutation(count)
    cut = int(round(count * (1 - TEST_SHARE)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _make(arrays: dict[str, np.ndarray], targets: np.ndarray) -> ZooData:
    train, test = _split(len(targets))
    return ZooData({k: v[train] for k, v in arrays.items()}, targets[train],
                   {k: v[test] for k, v in arrays.items()}, targets[test])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digit_images() -> ZooData:
    images, labels = _digits()
    return _make({"x": images[:, None]}, labels)


def digit_rows() -> ZooData:
    images, labels = _digits()
    return _make({"x": images}, labels)


def digit_signal() -> ZooData:
    images, labels = _digits()
    return _make({"x": images.reshape(len(images), 1, 64)}, labels)


def digit_masks() -> ZooData:
    images, _ = _digits()
    return _make({"x": images[:, None]}, (images > 0.3).astype(np.int64))


def _standardised(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / np.maximum(x.std(0), 1e-8)).astype(np.float32)


def wine() -> ZooData:
    from sklearn.datasets import load_wine

    data = load_wine()
    return _make({"x": _standardised(data.data)}, data.target.astype(np.int64))


def diabetes() -> ZooData:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    target = ((data.target - data.target.mean()) / data.target.std()).astype(np.float32)
    return _make({"x": _standardised(data.data)}, target[:, None])


def breast_cancer() -> ZooData:
    """The 'mean' features and the rest (less 'worst area', which the second output predicts)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = _standardised(data.data)
    names = list(data.feature_names)
    target_column = names.index("worst area")
    rest = [i for i in range(10, 30) if i != target_column]
    value = x[:, target_column:target_column + 1]
    return _make({"left": x[:, :10], "right": x[:, rest]}, np.concatenate([data.target[:, None], value], 1))


DOC_PACKAGES = ("email", "http", "xml", "unittest", "asyncio", "logging", "multiprocessing", "importlib")


def _docstrings() -> tuple[list[str], np.ndarray]:
    import importlib
    import pkgutil

    texts, labels = [], []
    for label, package in enumerate(DOC_PACKAGES):
        root = importlib.import_module(package)
        modules = [root]
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if "__main__" in info.name or ".test" in info.name:
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # a platform-specific module: its docstrings are simply not in the corpus
                continue
        seen = set()
        for module in modules:
            for obj in vars(module).values():
                if not str(getattr(obj, "__module__", "")).startswith(package):
                    continue
                members = [obj, *vars(obj).values()] if isinstance(obj, type) else [obj]
                for member in members:
                    doc = getattr(member, "__doc__", None)
                    if isinstance(doc, str) and len(doc.split()) >= 4 and id(member) not in seen:
                        seen.add(id(member))
                        texts.append(doc)
                        labels.append(label)
    return texts, np.asarray(labels, np.int64)


def _token_ids(text: str) -> list[int]:
    words = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    return [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in words][:MAX_TOKENS]


def docstrings() -> ZooData:
    """Which standard-library package a docstring comes from, from its first 32 words (hashed ids)."""
    texts, labels = _docstrings()
    ids = np.zeros((len(texts), MAX_TOKENS), np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = _token_ids(text) or [1]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return _make({"input_ids": ids, "attention_mask": mask}, labels)


# --- the zoo ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One family: its architecture, data, training, the FP32 quality it must reach and the ONNX ops
    its graph must contain. ``task`` is what ``optimize build --task`` gets; ``gate_labels``: whether
    its test labels go to the gate (``--eval-data``)."""

    name: str
    family: str
    factory: Callable[[], nn.Module]
    data: Callable[[], ZooData]
    task: str
    quality: str  # accuracy | pixel accuracy | r2 | accuracy+r2
    min_quality: float
    onnx_ops: tuple[str, ...]
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 64
    gate_labels: bool = True
    prunable: bool = True  # channel or head pruning applies
    notes: str = ""

    @property
    def arch(self) -> str:
        return f"models.zoo:{self.factory.__name__}"


ZOO = {m.name: m for m in [
    ZooModel("efficientnet", "EfficientNet-style CNN: depthwise separable, squeeze-excitation, SiLU",
             efficientnet, digit_images, "classify", "accuracy", 90.0, ("Conv:group", "Mul", "Sigmoid"), epochs=25),
    ZooModel("convnext", "ConvNeXt-style CNN: 7x7 depthwise, channels LayerNorm, GELU", convnext, digit_images,
             "classify", "accuracy", 90.0, ("Conv:group", "LayerNormalization", "Erf"), epochs=25),
    ZooModel("vit", "vision transformer on nn.MultiheadAttention", vit, digit_images, "classify", "accuracy", 85.0,
             ("MatMul", "Softmax", "LayerNormalization"), epochs=40, lr=2e-3),
    ZooModel("bert", "BERT-style encoder on token ids and an attention mask", bert, docstrings, "classify",
             "accuracy", 45.0, ("Gather", "MatMul", "Softmax", "LayerNormalization"), epochs=12, lr=2e-3),
    ZooModel("lstm", "LSTM over digit rows", lstm, digit_rows, "classify", "accuracy", 85.0, ("LSTM",), epochs=40,
             prunable=False, notes="torch-pruning does not prune recurrent layers"),
    ZooModel("gru", "GRU over digit rows", gru, digit_rows, "classify", "accuracy", 85.0, ("GRU",), epochs=40,
             prunable=False, notes="torch-pruning does not prune recurrent layers"),
    ZooModel("signal_cnn", "1-D convolution over a signal", signal_cnn, digit_signal, "classify", "accuracy", 85.0,
             ("Conv:1d",), epochs=30),
    ZooModel("tabular_classifier", "MLP on tabular data (wine), classification", tabular_classifier, wine,
             "classify", "accuracy", 90.0, ("Gemm",), epochs=60, batch_size=32),
    ZooModel("tabular_regressor", "MLP on tabular data (diabetes), regression", tabular_regressor, diabetes,
             "regress", "r2", 0.3, ("Gemm",), epochs=60, lr=1e-3, batch_size=32),
    ZooModel("two_in_two_out", "two inputs, two outputs (class logits and a value; breast cancer)",
             two_in_two_out, breast_cancer, "classify", "accuracy+r2", 90.0, ("Concat", "Gemm"), epochs=60,
             batch_size=32, gate_labels=False),
    ZooModel("segmenter", "dense output: per-pixel classes (digit foreground masks)", segmenter, digit_masks,
             "classify", "pixel accuracy", 95.0, ("ConvTranspose", "Concat"), epochs=15, gate_labels=False),
]}


def _loss(model: ZooModel, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if model.name == "two_in_two_out":
        logits, value = outputs
        return nn.functional.cross_entropy(logits, targets[:, 0].long()) + nn.functional.mse_loss(value, targets[:, 1:])
    if model.task == "regress":
        return nn.functional.mse_loss(outputs, targets)
    return nn.functional.cross_entropy(outputs, targets)


def quality(model: ZooModel, module: nn.Module, data: ZooData) -> dict[str, float]:
    """The FP32 model's quality on the test split (accuracy in percent, R^2)."""
    module.eval()
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(v) for v in data.test.values()])
    y = data.test_y
    if model.name == "two_in_two_out":
        logits, value = outputs
        accuracy = float((logits.argmax(1).numpy() == y[:, 0]).mean() * 100)
        return {"accuracy": accuracy, "r2": _r2(value.numpy(), y[:, 1:]), "score": accuracy}
    if model.task == "regress":
        r2 = _r2(outputs.numpy(), y)
        return {"r2": r2, "score": r2}
    accuracy = float((outputs.argmax(1).numpy() == y).mean() * 100)
    return {model.quality.replace(" ", "_"): accuracy, "score": accuracy}


def _r2(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(1 - ((predicted - actual) ** 2).sum() / ((actual - actual.mean()) ** 2).sum())


def train(model: ZooModel, data: ZooData) -> nn.Module:
    torch.manual_seed(SEED)
    module = model.factory()
    inputs = [torch.from_numpy(v) for v in data.train.values()]
    targets = torch.from_numpy(data.train_y)
    optimizer = torch.optim.AdamW(module.parameters(), lr=model.lr, weight_decay=1e-4)
    steps = model.epochs * int(np.ceil(len(targets) / model.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, model.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(SEED)
    module.train()
    for _ in range(model.epochs):
        for index in torch.randperm(len(targets), generator=generator).split(model.batch_size):
            loss = _loss(model, module(*[x[index] for x in inputs]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return module.eval()


def make(name: str, out_dir: str | Path) -> dict[str, Any]:
    """Train zoo model ``name``; write its checkpoint, unlabelled calibration data, test data (with
    labels where the gate takes them) and a summary; return the summary."""
    model = ZOO[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = model.data()
    module = train(model, data)
    torch.save(module.state_dict(), out / "model.pt")
    np.savez(out / "calib.npz", **data.train)
    test = dict(data.test)
    if model.gate_labels:
        test["labels"] = data.test_y
    np.savez(out / "eval.npz", **test)
    summary = {"name": name, "family": model.family, "arch": model.arch, "task": model.task,
               "train_samples": len(data.train_y), "test_samples": len(data.test_y),
               "quality": quality(model, module, data), "min_quality": model.min_quality,
               "onnx_ops": list(model.onnx_ops)}
    (out / "zoo.json").write_text(json.dumps(summary, indent=2))
    return summary


def graph_has(ops: dict[str, list[Any]], wanted: str) -> bool:
    """Is ``wanted`` (an op type, ``Conv:group`` a grouped convolution, ``Conv:1d`` a 1-D one) among a
    graph's nodes (``ops``: op type -> nodes)?"""
    kind, _, detail = wanted.partition(":")
    nodes = ops.get(kind, [])
    if not detail:
        return bool(nodes)

    def attribute(node: Any, name: str) -> Any:
        return next((a for a in node.attribute if a.name == name), None)
    if detail == "group":
        return any((attribute(n, "group") is not None and attribute(n, "group").i > 1) for n in nodes)
    if detail == "1d":
        return any(attribute(n, "kernel_shape") is not None and len(attribute(n, "kernel_shape").ints) == 1
                   for n in nodes)
    raise ValueError(f"unknown op detail {wanted!r}")


CPU_TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def build_args(name: str, folder: str | Path, out: str | Path, targets: tuple[str, ...] = CPU_TARGETS,
               *extra: str) -> list[str]:
    """``optimize build`` arguments for zoo model ``name`` made by ``make`` in ``folder``, default flags."""
    model, folder = ZOO[name], Path(folder)
    args = ["build", str(folder / "model.pt"), "--arch", model.arch, "--calib", str(folder / "calib.npz"),
            "--task", model.task, "--target", ",".join(targets), "--out", str(out), "--name", name]
    if model.gate_labels:
        args += ["--eval-data", str(folder / "eval.npz")]
    return args + list(extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("names", nargs="*", help=f"zoo models (default all: {', '.join(ZOO)})")
    args = parser.parse_args()
    for name in args.names or ZOO:
        print(json.dumps(make(name, Path(args.out_dir) / name)))


if __name__ == "__main__":
    main()
