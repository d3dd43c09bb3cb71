"""INT8 Q/DQ for TensorRT: our placement (``optimize.passes.precision.qdq_graph``) against NVIDIA ModelOpt's
ONNX quantizer (``modelopt.onnx.quantization.quantize``), same calibration data, both FP32 elsewhere
so ONNX Runtime runs them on CPU.

Compared: where Q/DQ sit (inputs and weights of Conv/Gemm, residual Adds, Q on convolution outputs,
zero points) and accuracy: real digits (labelled) and ResNet-18 (random weights; agreement with
FP32). Engine speed needs TensorRT and a GPU (``benchmarks/gpu/run.py``).

ModelOpt's ONNX extra pulls onnxruntime-gpu and CUDA wheels, which the project's CPU install must
not hold, so this runs in an environment of its own:

    python -m venv /tmp/modelopt && /tmp/modelopt/bin/pip install torch==2.13.0 onnx onnxruntime scikit-learn
    /tmp/modelopt/bin/pip install --no-deps nvidia-modelopt onnx-graphsurgeon polygraphy onnxslim ml_dtypes \
        onnxconverter-common lief cppimport pydantic pydantic-core annotated-types typing-inspection pulp \
        omegaconf antlr4-python3-runtime nvidia-ml-py rich markdown-it-py mdurl pygments regex safetensors \
        scipy pyyaml ninja tqdm packaging sympy mpmath onnxscript onnx-ir mako markupsafe filelock
    /tmp/modelopt/bin/python -m benchmarks.qdq_modelopt
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.common import environment, write_results
from optimize.inputs.calibration import Samples
from optimize.passes.precision import qdq_graph

QDQ = ("QuantizeLinear", "DequantizeLinear")


def export(model: torch.nn.Module, x: np.ndarray, path: Path) -> Path:
    torch.onnx.export(model, torch.from_numpy(x), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def modelopt_graph(source: Path, out: Path, calib: np.ndarray) -> Path:
    import modelopt.onnx.quantization as moq  # after ours: once it runs, it patches ONNX Runtime's calibrators

    moq.quantize(str(source), quantize_mode="int8", calibration_data={"x": calib}, calibration_method="max",
                 calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out), log_level="ERROR")
    return out


def structure(path: Path) -> dict[str, int]:
    """Where a graph's Q/DQ nodes sit."""
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}

    def dq_fed(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    count: collections.Counter = collections.Counter()
    zero_points = []
    for node in graph.node:
        if node.op_type in QDQ:
            count[node.op_type] += 1
            if len(node.input) > 2 and node.input[2] in initializers:
                zero_points.append(bool((onnx.numpy_helper.to_array(initializers[node.input[2]]) == 0).all()))
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            count["conv/gemm"] += 1
            count["conv/gemm with quantized input"] += dq_fed(node.input[0])
            count["conv/gemm with quantized weight"] += dq_fed(node.input[1])
        if node.op_type == "Add" and not set(node.input) & set(initializers):
            count["residual add"] += 1
            count["residual add inputs quantized"] += sum(dq_fed(i) for i in node.input)
        if node.op_type == "QuantizeLinear":
            source = producers.get(node.input[0])
            count["Q on a conv/gemm output"] += source is not None and source.op_type in ("Conv", "Gemm", "MatMul")
    count["all zero points 0"] = int(all(zero_points)) if zero_points else -1
    return dict(count)


def main() -> None:
    from models.digits import DigitsNet, digits_split, train
    from models.resnet import random_images, resnet18

    out = Path(tempfile.mkdtemp(prefix="qdq-modelopt-"))
    torch.manual_seed(0)
    images = random_images(80)
    r18 = export(resnet18().eval(), images[:1], out / "r18.onnx")
    train_x, train_y, test_x, test_y = digits_split()
    digits = export(train(DigitsNet(), train_x, train_y, epochs=10), test_x[:1], out / "digits.onnx")
    calib = train_x[:256]
    # Ours first: ModelOpt patches ONNX Runtime's calibrators once it has run.
    qdq_graph(digits, out / "digits_ours.onnx", Samples({"x": calib}))
    qdq_graph(r18, out / "r18_ours.onnx", Samples({"x": images[:64]}))
    graphs = {"digits": {"ours": out / "digits_ours.onnx"}, "resnet18": {"ours": out / "r18_ours.onnx"}}
    graphs["digits"]["modelopt"] = modelopt_graph(digits, out / "digits_modelopt.onnx", calib)
    graphs["resnet18"]["modelopt"] = modelopt_graph(r18, out / "r18_modelopt.onnx", images[:64])

    def accuracy(path: Path) -> float:
        return float((run(path, test_x).argmax(1) == test_y).mean() * 100)

    reference = run(r18, images[64:])

    def agreement(path: Path) -> dict[str, float]:
        y = run(path, images[64:])
        cosine = np.sum(y * reference, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(reference, axis=1)
        return {"top1_agreement_pct": float((y.argmax(1) == reference.argmax(1)).mean() * 100),
                "cosine": float(np.mean(cosine))}

    results: dict = {"digits": {"accuracy_pct": {"fp32": accuracy(digits)}}, "resnet18": {}}
    for who in ("ours", "modelopt"):
        results["digits"][who] = structure(graphs["digits"][who])
        results["digits"]["accuracy_pct"][who] = accuracy(graphs["digits"][who])
        results["resnet18"][who] = {**structure(graphs["resnet18"][who]), **agreement(graphs["resnet18"][who])}
    lines = ["# INT8 Q/DQ for TensorRT: ours against ModelOpt", "",
             "`python -m benchmarks.qdq_modelopt` (see its docstring for the environment).", "",
             "| model | graph | Q | DQ | Conv/Gemm with quantized input / weight | residual Adds with a quantized input "
             "| Q on a Conv/Gemm output | zero points all 0 | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for model in ("digits", "resnet18"):
        for who in ("ours", "modelopt"):
            row = results[model][who]
            quality = (f"{results[model]['accuracy_pct'][who]:.2f}% (FP32 {results[model]['accuracy_pct']['fp32']:.2f}%)"
                       if model == "digits" else
                       f"top-1 agreement {row['top1_agreement_pct']:.1f}%, cosine {row['cosine']:.5f}")
            lines.append(f"| {model} | {who} | {row.get('QuantizeLinear', 0)} | {row.get('DequantizeLinear', 0)} | "
                         f"{row.get('conv/gemm with quantized input', 0)} / {row.get('conv/gemm with quantized weight', 0)} "
                         f"of {row.get('conv/gemm', 0)} | {row.get('residual add inputs quantized', 0)} of "
                         f"{row.get('residual add', 0)} | {row.get('Q on a conv/gemm output', 0)} | "
                         f"{'yes' if row.get('all zero points 0') == 1 else 'no'} | {quality} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(Path("benchmarks/results/qdq_modelopt"), {**results, "environment": environment()}, text)


if __name__ == "__main__":
    main()
