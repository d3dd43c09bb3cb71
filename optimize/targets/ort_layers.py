"""An ONNX Runtime engine opened for per-layer error (``optimize.targets.layer_error``).

The engine's graph with the requested tensors added as outputs, run with the Runner's own session
options (so its optimizations and QDQ fusions run as they would, as far as exposing a tensor lets
them); a row's piece is the engine's nodes between tensors the reference also has, cut into a
model of its own and run with the same options (ONNX Runtime fuses its Q/DQ into QLinear kernels
as in the whole engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.targets.layer_error import LayerProbe

MAX_PIECE_NODES = 64
QUANTIZING_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                            "ConvInteger", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul", "QGemm"})  # a piece larger than this is no longer one layer: not cut out


class OnnxLayerProbe(LayerProbe):
    def __init__(self, engine: Path, options: Callable[[], Any], providers: list[str]):
        import onnx

        self._model = onnx.load(str(engine))
        self._options, self._providers = options, providers
        self._producer = {o: n for n in self._model.graph.node for o in n.output if o}
        self._weights = {i.name: i for i in self._model.graph.initializer}
        self._inputs = {i.name for i in self._model.graph.input} - set(self._weights)
        self._consumers: dict[str, list[Any]] = {}
        for node in self._model.graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._expected: dict[str, str] = {}  # tensor -> the op the reference made it with
        self._session: tuple[tuple[str, ...], Any] | None = None
        self._pieces: dict[str, Any] = {}
        self._cuts: dict[str, tuple[list[Any], tuple[str, ...]]] = {}

    def tensors(self) -> set[str]:
        return set(self._producer) | self._inputs

    def expect(self, rows: list[Any]) -> None:
        self._expected = {row.output: row.op for row in rows}

    def _visible(self, tensor: str) -> str:
        """Where a quantizer fused an activation into its producer (Conv + Relu: the engine's Conv
        writes the Relu's tensor, raw), the tensor through its Q/DQ pair, whose uint8 range applies
        the activation; elsewhere the tensor itself."""
        producer = self._producer.get(tensor)
        expected = self._expected.get(tensor)
        if producer is None or expected is None or producer.op_type == expected:
            return tensor
        consumers = self._consumers.get(tensor, [])
        if consumers and all(n.op_type == "QuantizeLinear" for n in consumers):
            dequantized = [n for n in self._consumers.get(consumers[0].output[0], []) if n.op_type == "DequantizeLinear"]
            if dequantized:
                return dequantized[0].output[0]
        return tensor

    def _open(self, model: Any, threads: int | None = None) -> Any:
        import onnxruntime as ort

        options = self._options()
        if threads:  # a piece is one layer: one thread, and no pool to start and stop per piece
            options.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), options, providers=self._providers)

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        import onnx

        key = tuple(names)
        visible = {name: self._visible(name) for name in names}
        if self._session is None or self._session[0] != key:
            model = onnx.ModelProto()
            model.CopyFrom(self._model)
            existing = {o.name for o in model.graph.output}
            for name in visible.values():
                if name in self._producer and name not in existing:
                    model.graph.output.append(onnx.ValueInfoProto(name=name))
                    existing.add(name)
            self._session = (key, self._open(model))
        session = self._session[1]
        wanted = [o.name for o in session.get_outputs()]
        values = dict(zip(wanted, session.run(wanted, feeds)))
        shown = {name: values[seen] for name, seen in visible.items() if seen in values}
        return {**{k: v for k, v in feeds.items() if k in names}, **values, **shown}

    def local_inputs(self, tensor: str, known: set[str]) -> tuple[str, ...] | None:
        if tensor not in self._producer:
            return None
        output = self._visible(tensor)
        nodes, starts, seen, frontier = [], set(), set(), [output]
        while frontier:
            name = frontier.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name not in (tensor, output) and name in known:
                starts.add(name)
                continue
            if name in self._weights:
                continue
            producer = self._producer.get(name)
            if producer is None:  # a model input the reference does not know
                return None
            if producer not in nodes:
                nodes.append(producer)
                if len(nodes) > MAX_PIECE_NODES:
                    return None
                frontier.extend(producer.input)
        order = {id(n): i for i, n in enumerate(self._model.graph.node)}
        nodes.sort(key=lambda n: order[id(n)])
        self._cuts[tensor] = (nodes, tuple(sorted(starts)))
        return tuple(sorted(starts))

    def keep_names(self, tensor: str) -> tuple[str, ...] | None:
        """The piece's own nodes when it quantizes anything, and the nodes that produce the tensors it
        quantizes (their output's Q/DQ goes only when they are left unquantized too): the names the
        quantizer's ``nodes_to_exclude`` takes (the engine keeps its FP32 graph's node names)."""
        nodes, starts = self._cuts.get(tensor, ([], ()))
        if not any(n.op_type in QUANTIZING_OPS for n in nodes):
            return None
        quantized = {n.input[0] for n in nodes if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")}
        producers = [self._producer[s] for s in starts if s in quantized and s in self._producer]
        names = [n.name for n in [*nodes, *producers] if n.op_type not in QUANTIZING_OPS and n.name]
        return tuple(dict.fromkeys(names)) or None

    def local(self, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = self._pieces.get(tensor)
        if session is None:
            session = self._pieces[tensor] = self._open(self._piece(tensor, feeds), threads=1)
        return session.run([self._visible(tensor)], feeds)[0]

    def _piece(self, tensor: str, feeds: dict[str, np.ndarray]) -> Any:
        import onnx
        from onnx import helper

        nodes, starts = self._cuts[tensor]
        used = {i for n in nodes for i in n.input}
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype),
                                                [None] * feeds[name].ndim) for name in starts]
        graph = helper.make_graph(nodes, "piece", inputs, [onnx.ValueInfoProto(name=self._visible(tensor))],
                                  [self._weights[name] for name in used if name in self._weights])
        model = helper.make_model(graph, opset_imports=self._model.opset_import)
        model.ir_version = self._model.ir_version
        return model

    def close(self) -> None:
        self._session, self._pieces = None, {}
