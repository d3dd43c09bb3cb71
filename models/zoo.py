"""A zoo of tiny models of different families, each trained for seconds on real data that ships in
packages, each with what it must satisfy.

Every ``ZooModel`` names its architecture (``models.zoo:<factory>``, what ``--arch`` takes; the
classes are in ``models.zoo_nets``), its data (``models.zoo_data``: scikit-learn's digits, wine,
breast cancer and diabetes sets; the standard library's docstrings; digit rows as a sequence,
digits as a 1-D signal, digit foreground masks as per-pixel labels), the FP32 quality it must reach on its test split, and the ONNX operations its exported
graph must contain, so that a zoo model cannot quietly become a simpler one.

    python -m models.zoo OUT_DIR [NAME ...]   # train and write OUT_DIR/NAME/{model.pt,calib.npz,eval.npz,zoo.json}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from models.zoo_data import (SEED, ZooData, breast_cancer, diabetes, digit_images, digit_masks, digit_rows,
                             digit_signal, docstrings, wine)
from models.zoo_nets import (bert, convnext, efficientnet, gru, lstm, segmenter, signal_cnn, tabular_classifier,
                             tabular_regressor, two_in_two_out, vit)

__all__ = ["ZOO", "ZooModel", "make", "build_args", "graph_has", "quality", "train", "CPU_TARGETS",
           "efficientnet", "convnext", "vit", "bert", "lstm", "gru", "signal_cnn", "tabular_classifier",
           "tabular_regressor", "two_in_two_out", "segmenter"]


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
