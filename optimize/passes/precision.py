"""Precision in the graph, for TensorRT's strongly typed networks: an FP16 graph and an INT8 Q/DQ graph.

TensorRT 11 builds every network strongly typed: a tensor's type is what the ONNX graph says, and
there are no FP16/INT8 builder flags or calibrators. So both reduced precisions are made here,
on the ONNX graph, where they can be checked without a GPU:

- ``fp16_graph``: initializers and activations in FP16, inputs and outputs kept FP32 (Casts at the
  edges). Ops that lose too much in FP16 stay FP32: the reductions and transcendental ops of
  ``KEEP_FP32_OPS``, and any node whose calibration outputs exceed ``DATA_MAX`` in magnitude (FP16
  tops out at 65504; the margin covers inputs the calibration set did not show).
- ``qdq_graph``: symmetric INT8 (zero points 0) as QuantizeLinear/DequantizeLinear pairs where
  TensorRT fuses them: the activation inputs of Conv, ConvTranspose, MatMul and Gemm; their weights
  as INT8 initializers behind a per-output-channel DequantizeLinear; and, on residual Adds, the
  input that does not come from a convolution (or, where both do, the shortcut's), so the Add
  fuses into the other convolution. Activation
  ranges come from ONNX Runtime's calibrators (MinMax, Entropy, Percentile) on the build's own
  calibration data. The result is an FP32 graph with Q/DQ that ONNX Runtime runs on CPU, which is
  how its accuracy is checked here; ``fp16_graph`` then turns the rest to FP16 for TensorRT.

``graph_report`` summarises a graph (ops, Q/DQ placement, zero points, per-channel axes) for the
manifest and the tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optimize.inputs.calibration import Samples
from optimize.errors import BuildError
from optimize.passes.weight_only import symmetric_int8

# Accumulate over many elements or grow fast: FP16 would overflow or lose the result.
KEEP_FP32_OPS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow", "Sqrt",
                 "Reciprocal", "Exp", "Log", "Softmax", "LogSoftmax", "LayerNormalization", "CumSum", "Range",
                 "RandomNormal", "RandomUniform", "Einsum")
DATA_MAX = 16384.0
FP16_MAX = 65504.0
QDQ_OPSET = 19  # FP16 scales on QuantizeLinear/DequantizeLinear need opset 19
WEIGHT_OPS = {"Conv": 0, "ConvTranspose": 1, "Gemm": None, "MatMul": 1}  # op -> output-channel axis of its weight
# ONNX ops that TensorRT's ONNX parser takes with FP16 tensors (the parser's operator support table).
TRT_FP16_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear",
    "Div", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GroupNormalization",
    "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mul", "Neg", "Not",
    "Or", "PRelu", "Pad", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Resize", "ScatterElements", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax",
    "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Swish", "Tanh", "Tile",
    "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"})


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise BuildError(f"cannot read ONNX graph {path}: {exc}") from exc


def _node_output_ranges(model_path: Path, samples: Samples | None, limit: int = 16) -> dict[str, float]:
    """Largest magnitude each node output reaches on a few calibration samples (ONNX Runtime, FP32)."""
    if samples is None or len(samples) == 0:
        return {}
    import onnx
    import onnxruntime as ort

    model = _load(model_path)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {}
    feeds = {k: v[:limit] for k, v in samples.arrays.items()}
    for name, value in zip(names, session.run(names, feeds)):
        value = np.asarray(value)
        if value.dtype.kind == "f" and value.size:
            peaks[name] = float(np.max(np.abs(value[np.isfinite(value)]))) if np.isfinite(value).any() else np.inf
    return peaks


def _large_constants(model: Any, data_max: float) -> set[str]:
    """Initializers and Constant outputs holding values FP16 cannot carry (their consumers stay FP32)."""
    from onnx import numpy_helper

    found = set()
    tensors = [(i.name, i) for i in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for name, tensor in tensors:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.size and float(np.max(np.abs(array))) > data_max:
            found.add(name)
    return found


def fp16_graph(model_path: Path, out_path: Path, samples: Samples | None = None,
               keep_fp32: tuple[str, ...] = (), data_max: float = DATA_MAX) -> dict[str, Any]:
    """Write an FP16 version of ``model_path`` (FP32 inputs/outputs) and say what stayed FP32."""
    import onnx
    from onnxconverter_common import float16

    model = _load(model_path)
    peaks = _node_output_ranges(model_path, samples)
    big_constants = _large_constants(model, data_max)
    large = sorted(n.name for n in model.graph.node
                   if n.name and (any(peaks.get(o, 0.0) > data_max for o in n.output)
                                  or any(i in big_constants for i in [*n.input, *n.output])))
    keep_ops = sorted({n.op_type for n in model.graph.node} & set(KEEP_FP32_OPS))
    blocked = sorted(set(large) | set(keep_fp32))
    try:
        converted = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                                     max_finite_val=FP16_MAX, op_block_list=keep_ops,
                                                     node_block_list=blocked)
    except Exception as exc:  # onnxconverter-common refused the graph (--debug shows why)
        raise BuildError(f"FP16 conversion of {model_path.name} failed: {exc}") from exc
    _repair_casts(converted, model)
    onnx.checker.check_model(converted)  # a graph our repair broke is our bug: keep its traceback
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path))
    return {"fp32_ops": keep_ops, "fp32_nodes_large_values": large, "fp32_nodes_asked": list(keep_fp32),
            "data_max": data_max, "range_samples": min(len(samples), 16) if samples is not None else 0}


def _repair_casts(converted: Any, original: Any) -> None:
    """Undo two slips of the converter around FP32-kept nodes: FP32 -> FP16 -> FP32 Cast round trips
    between them (the FP16 step loses exactly what they were kept for), and graph outputs left FP16
    when the last node is kept FP32."""
    import onnx
    from onnx import TensorProto

    graph = converted.graph
    inferred = onnx.shape_inference.infer_shapes(converted).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    types.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    producers = {o: n for n in graph.node for o in n.output}

    def cast_to(node: Any) -> int:
        return next(a.i for a in node.attribute if a.name == "to")

    rename = {}
    for node in graph.node:
        if node.op_type == "Cast" and cast_to(node) == TensorProto.FLOAT:
            first = producers.get(node.input[0])
            if (first is not None and first.op_type == "Cast" and cast_to(first) == TensorProto.FLOAT16
                    and types.get(first.input[0]) == TensorProto.FLOAT):
                rename[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    wanted = {v.name: v.type.tensor_type.elem_type for v in original.graph.output}
    for value in graph.output:  # outputs keep the original model's type
        want = wanted.get(value.name)
        node = producers.get(value.name)
        if want is not None and value.type.tensor_type.elem_type != want and node is not None \
                and node.op_type == "Cast" and types.get(node.input[0]) == want:
            next(a for a in node.attribute if a.name == "to").i = want
            value.type.tensor_type.elem_type = want
    outputs = {o.name for o in graph.output}
    while True:  # drop Casts nothing reads any more
        used = {i for n in graph.node for i in n.input} | outputs
        kept = [n for n in graph.node if n.op_type not in ("Cast", "Constant") or any(o in used for o in n.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _conv_fed(name: str, producers: dict[str, Any]) -> bool:
    """Does tensor ``name`` come straight from a convolution (through BatchNormalization at most)?"""
    node = producers.get(name)
    while node is not None and node.op_type in ("BatchNormalization", "Identity"):
        node = producers.get(node.input[0])
    return node is not None and node.op_type in ("Conv", "ConvTranspose")


def _placement(graph, keep_fp32: tuple[str, ...]) -> tuple[set[str], list[tuple[Any, int, int]]]:
    """Activation tensors to quantize, and (node, weight input index, channel axis) weights."""
    initializers = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    activations: set[str] = set()
    weights = []
    for node in graph.node:
        if node.name in keep_fp32:
            continue
        if node.op_type in WEIGHT_OPS:
            inputs = list(node.input[:2])
            for index, name in enumerate(inputs):
                if name in initializers:
                    axis = WEIGHT_OPS[node.op_type]
                    if node.op_type == "Gemm":
                        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                        axis = 0 if trans_b else 1
                    if index == 1:
                        weights.append((node, index, axis))
                elif name:
                    activations.add(name)
        elif node.op_type == "Add" and len(node.input) == 2 and not (set(node.input) & initializers):
            residual = [n for n in node.input if not _conv_fed(n, producers)]
            if len(residual) == 1:  # a skip connection joining a convolution's output
                activations.add(residual[0])
            elif not residual:  # both from convolutions (a downsampling shortcut): the second is the shortcut
                activations.add(node.input[1])
    return activations, weights


def _calibrate(model_path: Path, tensors: set[str], calibration: Samples, method: str,
               batch_size: int) -> dict[str, float]:
    """Symmetric range (largest magnitude) of each tensor over the calibration data."""
    from onnxruntime.quantization.calibrate import create_calibrator

    from optimize.passes.ort_calibration import calibration_method, calibration_reader

    extra = {"symmetric": True}
    if method == "percentile":
        extra["percentile"] = 99.99
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(model_path), op_types_to_calibrate=None,
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calibration_method(method), extra_options=extra)
        calibrator.set_execution_providers(["CPUExecutionProvider"])
        calibrator.collect_data(calibration_reader(calibration, batch_size))
        data = calibrator.compute_data()
    ranges = {}
    for name in tensors:
        if name in data:
            low, high = (float(np.asarray(v).reshape(-1)[0]) for v in data[name].range_value)
            ranges[name] = max(abs(low), abs(high))
    missing = sorted(tensors - set(ranges))
    if missing:
        raise BuildError(f"calibration gave no range for {len(missing)} tensor(s), e.g. {missing[:3]}")
    return ranges


QUANTIZED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add"}


def _insert_activation_qdq(graph: Any, activations: set[str], ranges: dict[str, float],
                           keep_fp32: tuple[str, ...]) -> tuple[list, list]:
    """A per-tensor symmetric Q -> DQ pair on each activation, fed to the ops that consume it
    (the residual input of an Add only; both when both come from convolutions)."""
    from onnx import helper, numpy_helper

    consumers = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    nodes, initializers = [], []
    for name in sorted(activations):
        scale = max(ranges[name], 1e-8) / 127.0
        base = name.replace("/", "_").replace(":", "_")
        initializers += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_qscale"),
                         numpy_helper.from_array(np.array(0, np.int8), f"{base}_qzero")]
        nodes += [helper.make_node("QuantizeLinear", [name, f"{base}_qscale", f"{base}_qzero"], [f"{base}_q"],
                                   name=f"{base}_QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_qscale", f"{base}_qzero"],
                                   [f"{base}_dq"], name=f"{base}_DequantizeLinear")]
        for node in consumers.get(name, []):
            if node.op_type in QUANTIZED_OPS and node.name not in keep_fp32:
                for i, value in enumerate(node.input):
                    if value == name and (node.op_type != "Add" or not _conv_fed(value, producers)
                                          or all(_conv_fed(v, producers) for v in node.input)):
                        node.input[i] = f"{base}_dq"
    return nodes, initializers


def _insert_weight_dq(graph: Any, weights: list[tuple[Any, int, int]]) -> tuple[list, list]:
    """Each weight stored as INT8 behind a per-output-channel DequantizeLinear (zero points 0)."""
    from onnx import helper, numpy_helper

    by_name = {i.name: i for i in graph.initializer}
    nodes, initializers = [], []
    for node, index, axis in weights:
        source = by_name[node.input[index]]
        q, scale = symmetric_int8(numpy_helper.to_array(source), axis)
        base = f"{source.name}_{node.name}".replace("/", "_")
        initializers += [numpy_helper.from_array(q, f"{base}_int8"),
                         numpy_helper.from_array(scale.astype(np.float32), f"{base}_wscale"),
                         numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_wzero")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}_int8", f"{base}_wscale", f"{base}_wzero"],
                                      [f"{base}_wdq"], name=f"{base}_DequantizeLinear", axis=axis))
        node.input[index] = f"{base}_wdq"
    return nodes, initializers


def qdq_graph(model_path: Path, out_path: Path, calibration: Samples, method: str = "minmax",
              batch_size: int = 8, keep_fp32: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write an FP32 graph with symmetric INT8 Q/DQ placed for TensorRT; return what was quantized."""
    import onnx

    if calibration is None or len(calibration) == 0:
        raise BuildError("INT8 Q/DQ needs calibration data: pass --calib")
    model = _load(model_path)
    graph = model.graph
    activations, weights = _placement(graph, keep_fp32)
    ranges = _calibrate(model_path, activations, calibration, method, batch_size)
    activation_nodes, activation_inits = _insert_activation_qdq(graph, activations, ranges, keep_fp32)
    weight_nodes, weight_inits = _insert_weight_dq(graph, weights)
    graph.initializer.extend(activation_inits + weight_inits)
    # Q/DQ nodes go first in the list; a topological sort puts them right after their producers.
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(_toposort(activation_nodes + weight_nodes + nodes, graph))
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)  # a Q/DQ graph we built wrong is our bug: keep its traceback
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return {"format": "QDQ", "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per channel",
            "quantized_activations": len(activations), "quantized_weights": len(weights),
            "calib_method": method, "calib_samples": len(calibration), "kept_fp32": list(keep_fp32)}


def _toposort(nodes: list, graph) -> list:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise BuildError(f"the graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    return ordered


def to_opset(model_path: Path, out_path: Path, opset: int = QDQ_OPSET) -> None:
    """Rewrite a graph for a newer default-domain opset (FP16 Q/DQ scales need 19)."""
    import onnx
    from onnx import version_converter

    model = _load(model_path)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current < opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:
            raise BuildError(f"cannot convert {model_path.name} to opset {opset}: {exc}") from exc
    onnx.save(model, str(out_path))


def graph_report(model_path: Path) -> dict[str, Any]:
    """Ops, precision and Q/DQ placement of a graph."""
    from onnx import numpy_helper

    model = _load(model_path)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    zero_points, per_channel, quantized_inputs = [], [], []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is not None:
                array = numpy_helper.to_array(zero)
                zero_points.append((str(array.dtype), bool(np.all(array == 0))))
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                scale = numpy_helper.to_array(initializers[node.input[1]])
                per_channel.append(scale.ndim == 1 and scale.size > 1)
        for index, name in enumerate(node.input):
            source = producers.get(name)
            if source is not None and source.op_type == "DequantizeLinear" and node.op_type != "QuantizeLinear":
                quantized_inputs.append((node.op_type, index, source.input[0] in initializers))
    elem = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}
    return {"ops": sorted({n.op_type for n in graph.node}),
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "initializer_types": sorted({elem.get(i.data_type, str(i.data_type)) for i in graph.initializer}),
            "zero_points": zero_points, "weights_per_channel": per_channel, "quantized_inputs": quantized_inputs,
            "inputs": {i.name: elem.get(i.type.tensor_type.elem_type) for i in graph.input},
            "outputs": {o.name: elem.get(o.type.tensor_type.elem_type) for o in graph.output}}
