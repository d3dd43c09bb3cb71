"""Weight-only INT8 for ONNX: MatMul/Gemm weights and Gather tables (embeddings) as int8 + scales.

Each constant weight becomes ``DequantizeLinear(w_int8, scale, axis)``; activations and compute
stay FP32. Symmetric (zero point 0), one scale per output channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimize.errors import BuildError


def symmetric_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per index of ``axis``): symmetric, zero point 0, range +-127."""
    weight = np.asarray(weight, np.float32)
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    peak = np.abs(weight).max(axis=reduce_axes) if weight.ndim > 1 else np.abs(weight)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8), scale


MIN_ELEMENTS = 1024  # smaller weights stay FP32: their scales would cost more than INT8 saves


def quantize_weights(onnx_path: Path, target: Path, keep_fp32: tuple[str, ...] = (),
                     min_elements: int = MIN_ELEMENTS) -> dict:
    import onnx
    model = onnx.load(str(onnx_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes, quantized, kept = [], [], []
    for node in graph.node:
        if node.op_type == "Gather" and node.name not in keep_fp32:
            # Embedding tables: one scale per row (token), gathered after dequantization.
            init = initializers.get(node.input[0])
            if (init is not None and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2
                    and int(np.prod(init.dims)) >= min_elements and consumers.get(init.name, 0) == 1):
                new_nodes.append(_dequantize(graph, init, axis=0))
                quantized.append(node.name)
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            weight_name = node.input[1]
            init = initializers.get(weight_name)
            if node.name in keep_fp32:
                kept.append(node.name)
            elif (init is not None and init.data_type == onnx.TensorProto.FLOAT
                  and len(init.dims) == 2 and int(np.prod(init.dims)) >= min_elements
                  and consumers.get(weight_name, 0) == 1):
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                # Output channels: columns of a (K, N) MatMul weight, rows of a transposed Gemm B.
                axis = 0 if (node.op_type == "Gemm" and trans_b) else 1
                new_nodes.append(_dequantize(graph, init, axis))
                quantized.append(node.name)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(op.domain in ("", "ai.onnx") and op.version >= 13 for op in model.opset_import):
        raise BuildError(f"{onnx_path.name} has opset {_opset(model)}: weight-only INT8 needs opset 13 or newer "
                         f"(per-axis DequantizeLinear); export with a newer opset or use --int8-scheme static")
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return {"weights": "int8 symmetric per output channel (embeddings per row)", "activations": "fp32",
            "quantized_nodes": len(quantized), "kept_fp32": kept}


def _dequantize(graph, init, axis: int):
    """Replace initializer ``init`` by int8 + scale and return the DequantizeLinear node."""
    from onnx import helper, numpy_helper

    q, scale = symmetric_int8(numpy_helper.to_array(init), axis)
    name = init.name
    graph.initializer.remove(init)
    graph.initializer.extend([numpy_helper.from_array(q, name + "_int8"),
                              numpy_helper.from_array(scale, name + "_scale")])
    return helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name],
                            name=name + "_dequantize", axis=axis)


def _opset(model) -> int | None:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
