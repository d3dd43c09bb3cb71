"""OpenVINO's own account of what it runs: a compiled model's runtime (execution) graph, read into
``Layer`` rows, and the weights an IR stores.

Each runtime node carries ``layerType``, ``runtimePrecision``, ``primitiveType`` (the kernel, e.g.
``brgconv_avx512_I8``) and ``originalLayersNames``; compiled at one sample's shape, its shapes are
static, so MACs follow from them.
"""

from __future__ import annotations

from typing import Any

from optimize.targets.coverage import Layer, product

_RUNTIME_PRECISIONS = {"u8": "int8", "i8": "int8", "bf16": "bf16", "f16": "fp16", "f32": "fp32", "u4": "int4",
                       "i4": "int4", "f8e4m3": "fp8", "f8e5m2": "fp8"}
MAC_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "ScaledDotProductAttention",
              "RNNSeq")


def original_macs(model: Any) -> dict[str, int]:
    """MACs of the matrix products and convolutions of a model with static shapes, by op name: what a
    fused runtime node (a Snippets ``Subgraph`` holding attention, say) computes."""
    out = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul", "Convolution", "GroupConvolution") or op.get_input_size() < 2:
            continue
        shapes = [op.get_input_partial_shape(0), op.get_input_partial_shape(1), op.get_output_partial_shape(0)]
        if not all(s.is_static for s in shapes):
            continue
        a, w, o = ([d.get_length() for d in s] for s in shapes)
        if kind == "MatMul":
            k = a[-2] if op.get_attributes().get("transpose_a") and len(a) >= 2 else a[-1]
            out[op.get_friendly_name()] = product(o) * k
        else:
            out[op.get_friendly_name()] = product(o) * product(w[2:] if len(w) == len(o) + 1 else w[1:])
    return out


def runtime_layers(runtime_model: Any, fused: dict[str, int] | None = None) -> list[Layer]:
    """The MAC-bearing nodes of a compiled model's runtime (execution) graph: MACs from their static
    shapes, precision from the element type of their first input, the kernel from ``primitiveType``.
    A node that fused matrix products into code of its own (a ``Subgraph``) counts the MACs of the
    original ops it names (``fused``: MACs by original op name) in its ``runtimePrecision``."""
    layers = []
    for op in runtime_model.get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        kernel = info["primitiveType"].astype(str) if "primitiveType" in info else None
        originals = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        if kind not in MAC_LAYERS and fused and originals:
            macs = _attention_macs(op) or sum(fused.get(name, 0) for name in originals)
            if macs:
                precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
                layers.append(Layer(op.get_friendly_name(), kind, _RUNTIME_PRECISIONS.get(precision, precision),
                                    int(macs), kernel))
            continue
        if kind not in MAC_LAYERS or op.get_input_size() < 2:
            continue
        shapes = [op.input(i).get_partial_shape() for i in range(op.get_input_size())]
        out = op.output(0).get_partial_shape()
        if not all(s.is_static for s in shapes[:2]) or not out.is_static:
            continue
        a, w, o = ([d.get_length() for d in s] for s in (shapes[0], shapes[1], out))
        if kind in ("Convolution", "GroupConvolution"):
            macs = product(o) * product(w[2:] if len(w) == len(o) + 1 else w[1:])
        elif kind == "Deconvolution":
            macs = product(a) * product(w[1:])
        elif kind == "RNNSeq":  # X, states, (lengths,) W [dirs, gates x hidden, in], R, B
            rank3 = [[d.get_length() for d in s] for s in shapes[3:] if s.is_static and len(s) == 3]
            if len(rank3) < 2:
                continue
            (dirs, gates, inputs_), (_, _, hidden) = rank3[-2][:3], rank3[-1][:3]
            macs = product(a[:2]) * dirs * gates * (inputs_ + hidden)
        elif kind == "ScaledDotProductAttention":
            v = [d.get_length() for d in shapes[2]] if len(shapes) > 2 and shapes[2].is_static else w
            macs = product(a[:-1]) * w[-2] * (a[-1] + v[-1])
        else:  # FullyConnected, MatMul: out x the reduced axis of the first input
            macs = product(o) * (a[-1] if len(a) < 2 or len(o) < 2 or a[-2] == o[-2] else a[-2])
        element = op.input(0).get_element_type().get_type_name()
        layers.append(Layer(op.get_friendly_name(), kind, _RUNTIME_PRECISIONS.get(element, element), int(macs), kernel))
    return layers


def _attention_macs(op: Any) -> int:
    """A Snippets attention subgraph's two products from its inputs: Q [B, S, H, D], K transposed
    [B, H, D, L], (masks,) V [B, L, H, Dv] -> B*H*S*L*(D + Dv); 0 when the inputs are not that."""
    shapes = [op.input(i).get_partial_shape() for i in range(op.get_input_size())]
    if len(shapes) < 3 or not all(s.is_static and len(s) == 4 for s in (shapes[0], shapes[1], shapes[-1])):
        return 0
    (b, s, h, d), (b2, h2, d2, length), (b3, l3, h3, dv) = ([x.get_length() for x in shape]
                                                          for shape in (shapes[0], shapes[1], shapes[-1]))
    if (b, h, d) != (b2, h2, d2) or (b, length, h) != (b3, l3, h3):
        return 0
    return b * h * s * length * (d + dv)


def ir_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the model's constants by precision, as the IR stores them (integer shape constants left out)."""
    out: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        element = op.get_element_type()
        precision = _RUNTIME_PRECISIONS.get(element.get_type_name())
        if precision is None:
            continue
        shape = op.get_output_partial_shape(0)
        count = product(d.get_length() for d in shape) if shape.is_static else 0
        out[precision] = out.get(precision, 0) + (count * element.bitwidth + 7) // 8
    return out
