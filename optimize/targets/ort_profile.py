"""ONNX Runtime's own account of what it ran: the profile of one run, read into ``Layer`` rows.

Each executed node's event names its op (QLinearConv, MatMulInteger, ... or the float op) and the
types and shapes of its inputs and outputs; the graph ONNX Runtime optimized gives the weights a
convolution's MACs need (the profile leaves out prepacked weights). ONNX Runtime does not name the
instruction set a kernel uses.
"""

from __future__ import annotations

from typing import Any

from optimize.targets.coverage import Layer, product

# Ops that compute in INT8 whatever their input types say; MAC-bearing ops by how their MACs count.
INT8_COMPUTE = {"QLinearConvTranspose", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                "DynamicQuantizeMatMul", "QGemm", "QAttention", "DynamicQuantizeLSTM"}
CONV_WEIGHT_INPUT = {"QLinearConvTranspose": 3, "Conv": 1, "FusedConv": 1, "NchwcConv": 1, "ConvInteger": 1, "NhwcFusedConv": 1,
                     "QLinearConv": 3, "ConvTranspose": 1}
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"}
ATTENTION_OPS = {"Attention", "QAttention", "MultiHeadAttention"}
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}  # inputs: X, W [dirs, gates x hidden, in], R
_TYPE_PRECISIONS = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "uint8": "int8"}


def profiled_layers(events: list[dict[str, Any]], graph: Any) -> list[Layer]:
    """The MAC-bearing nodes ONNX Runtime executed (its profile's node events), with their MACs from
    the shapes it ran and the optimized graph's weights, and the precision their op and inputs say."""
    from onnx import helper

    nodes = {n.name: n for n in graph.node}
    weights = {i.name: list(i.dims) for i in graph.initializer}
    layers = []
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name, args = event["name"][: -len("_kernel_time")], event.get("args", {})
        op = args.get("op_name", "")
        if op not in CONV_WEIGHT_INPUT and op not in MATMUL_OPS and op not in ATTENTION_OPS and op not in RECURRENT_OPS:
            continue
        inputs = [next(iter(t.items())) for t in args.get("input_type_shape", [])]
        outputs = [next(iter(t.values())) for t in args.get("output_type_shape", [])]
        node = nodes.get(name)
        if not inputs or not outputs or node is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out = outputs[0]

        def shape_of(index: int) -> list[int] | None:
            """An input's shape: the initializer's (the profile leaves prepacked weights out), else
            what the profile ran (a weight dequantized on every run, say)."""
            if len(node.input) <= index:
                return None
            if node.input[index] in weights:
                return weights[node.input[index]]
            listed = [shape for name, shape in zip(node.input, [s for _, s in inputs]) if name == node.input[index]]
            return listed[0] if listed and len(listed[0]) >= 2 else None

        if op in CONV_WEIGHT_INPUT:
            w = shape_of(CONV_WEIGHT_INPUT[op])
            if w is None:
                continue
            macs = (product(inputs[0][1]) if op == "ConvTranspose" else product(out)) * product(w[1:])
        elif op in RECURRENT_OPS:  # every step: gates x hidden outputs over the input and the hidden state
            w, r = shape_of(1), shape_of(2)
            if w is None or r is None or len(w) < 3 or len(r) < 3:
                continue
            macs = product(inputs[0][1][:2]) * w[0] * w[1] * (w[2] + r[2])
        elif op in MATMUL_OPS:
            a = inputs[0][1]
            k = a[-2] if attrs.get("transA") and len(a) >= 2 else a[-1]
            macs = product(out) * k
        else:  # attention: the projections (weights hidden x 3 hidden), then two S x S products
            a = inputs[0][1]
            w = weights.get(node.input[1]) if len(node.input) > 1 else None
            batch_seq, hidden = product(a[:-1]), a[-1]
            seq = a[-2] if len(a) >= 3 else 1
            macs = (batch_seq * product(w) if w else 0) + 2 * batch_seq * seq * hidden
        precision = "int8" if op in INT8_COMPUTE else _TYPE_PRECISIONS.get(inputs[0][0], inputs[0][0])
        layers.append(Layer(name, op, precision, int(macs)))
    return layers
