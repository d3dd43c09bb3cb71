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
import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.common import environment, write_results
from optimize.calibration import Samples
from optimize.passes.precision import qdq_graph

import modelopt.onnx.quantization as moq  # noqa: E402  (after ours: it patches ONNX Runtime's calibrators)

out = Path(tempfile.mkdtemp(prefix="qdq-modelopt-"))
def export(model, x, path):
    torch.onnx.export(model, torch.from_numpy(x), str(path), input_names=["x"], output_names=["y"], opset_version=18,
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
def run(path, x):
    o = ort.SessionOptions(); o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
def structure(path):
    g = onnx.load(str(path)).graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    def dq_fed(name):
        p = prod.get(name); return p is not None and p.op_type == "DequantizeLinear"
    s = collections.Counter()
    for n in g.node:
        s[n.op_type] += 0
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"): s[n.op_type] += 1
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            s["conv/gemm"] += 1
            s["conv/gemm with quantized input"] += dq_fed(n.input[0])
            s["conv/gemm with quantized weight"] += dq_fed(n.input[1]) or n.input[1] not in inits and prod.get(n.input[1]) is not None and prod[n.input[1]].op_type == "DequantizeLinear"
        if n.op_type == "Add" and not set(n.input) & inits:
            s["residual add"] += 1
            s["residual add inputs quantized"] += sum(dq_fed(i) for i in n.input)
        if n.op_type == "QuantizeLinear":
            src = prod.get(n.input[0])
            if src is not None and src.op_type in ("Conv", "Gemm", "MatMul"): s["Q on a conv/gemm output"] += 1
    zps = []
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            z = onnx.numpy_helper.to_array(next(i for i in g.initializer if i.name == n.input[2])); zps.append(bool((z == 0).all()))
    s["all zero points 0"] = int(all(zps)) if zps else -1
    return {k: int(v) for k, v in s.items() if k[0].islower() or k in ("QuantizeLinear", "DequantizeLinear")}

results = {}
from models.resnet import resnet18, random_images
torch.manual_seed(0)
r = resnet18().eval()
imgs = random_images(80)
export(r, imgs[:1], out / "r18.onnx")
qdq_graph(out / "r18.onnx", out / "r18_ours.onnx", Samples({"x": imgs[:64]}))
# 1. digits CNN, trained on real digits: accuracy
from models.digits import DigitsNet, digits_split, train
tx, ty, vx, vy = digits_split()
m = train(DigitsNet(), tx, ty, epochs=10)
export(m, vx[:1], out / "digits.onnx")
calib = tx[:256]
qdq_graph(out / "digits.onnx", out / "digits_ours.onnx", Samples({"x": calib}))
# ModelOpt patches ONNX Runtime's calibrators when it runs: our graphs are made first
moq.quantize(str(out / "digits.onnx"), quantize_mode="int8", calibration_data={"x": calib}, calibration_method="max",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out / "digits_modelopt.onnx"), log_level="ERROR")
acc = lambda p: float((run(p, vx).argmax(1) == vy).mean() * 100)
results["digits"] = {"accuracy_pct": {k: acc(out / f) for k, f in [("fp32", "digits.onnx"), ("ours", "digits_ours.onnx"), ("modelopt", "digits_modelopt.onnx")]},
                     "ours": structure(out / "digits_ours.onnx"), "modelopt": structure(out / "digits_modelopt.onnx")}
# 2. ResNet-18 (random weights): structure and output agreement
moq.quantize(str(out / "r18.onnx"), quantize_mode="int8", calibration_data={"x": imgs[:64]}, calibration_method="max",
             calibration_eps=["cpu"], high_precision_dtype="fp32", output_path=str(out / "r18_modelopt.onnx"), log_level="ERROR")
ref = run(out / "r18.onnx", imgs[64:])
def agree(p):
    y = run(p, imgs[64:]); return {"top1_agreement_pct": float((y.argmax(1) == ref.argmax(1)).mean() * 100),
                                   "cosine": float(np.mean(np.sum(y * ref, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)))}
results["resnet18"] = {"ours": {**structure(out / "r18_ours.onnx"), **agree(out / "r18_ours.onnx")},
                       "modelopt": {**structure(out / "r18_modelopt.onnx"), **agree(out / "r18_modelopt.onnx")}}
lines = ["# INT8 Q/DQ for TensorRT: ours against ModelOpt", "", "`python -m benchmarks.qdq_modelopt` (see its docstring for the environment).", "",
         "| model | graph | Q | DQ | Conv/Gemm with quantized input / weight | residual Adds with a quantized input | Q on a Conv/Gemm output | zero points all 0 | accuracy |",
         "|---|---|---|---|---|---|---|---|---|"]
for model in ("digits", "resnet18"):
    for who in ("ours", "modelopt"):
        s_ = results[model][who]
        accuracy = (f"{results[model]['accuracy_pct'][who]:.2f}% (FP32 {results[model]['accuracy_pct']['fp32']:.2f}%)"
                    if model == "digits" else f"top-1 agreement {s_['top1_agreement_pct']:.1f}%, cosine {s_['cosine']:.5f}")
        lines.append(f"| {model} | {who} | {s_.get('QuantizeLinear', 0)} | {s_.get('DequantizeLinear', 0)} | "
                     f"{s_.get('conv/gemm with quantized input', 0)} / {s_.get('conv/gemm with quantized weight', 0)} of {s_.get('conv/gemm', 0)} | "
                     f"{s_.get('residual add inputs quantized', 0)} of {s_.get('residual add', 0)} | {s_.get('Q on a conv/gemm output', 0)} | "
                     f"{'yes' if s_.get('all zero points 0') == 1 else 'no'} | {accuracy} |")
text = "\n".join(lines) + "\n"
print(text)
results["environment"] = environment()
write_results(Path("benchmarks/results/qdq_modelopt"), results, text)
