"""An OpenVINO engine opened for per-layer error (``optimize.targets.layer_error``).

The IR read again, the requested tensors added as outputs (``Model.add_outputs`` by tensor name),
compiled with the Runner's own properties; a row's piece is the IR's ops between tensors the
reference also has (NNCF's FakeQuantize and weight decompression included), cut out with new
Parameters in place of its inputs and compiled alone with the same properties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from optimize.targets.layer_error import LayerProbe

MAX_PIECE_OPS = 96  # constants and weight decompression count: a piece larger than this is no longer one layer


class OpenVinoLayerProbe(LayerProbe):
    def __init__(self, core: Any, xml: Path, properties: dict[str, Any]):
        self._core, self._xml, self._properties = core, xml, properties
        self._model = core.read_model(str(xml))
        self._outputs: dict[str, Any] = {}  # tensor name -> the op output carrying it
        for op in self._model.get_ordered_ops():
            for port in op.outputs():
                for name in port.get_names():
                    self._outputs.setdefault(name, port)
        self._compiled: tuple[tuple[str, ...], Any] | None = None
        self._pieces: dict[str, Any] = {}
        self._cuts: dict[str, tuple[str, ...]] = {}

    def tensors(self) -> set[str]:
        return set(self._outputs)

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        key = tuple(names)
        if self._compiled is None or self._compiled[0] != key:
            model = self._core.read_model(str(self._xml))
            present = {n for op in model.get_ordered_ops() for p in op.outputs() for n in p.get_names()}
            parameters = {n for p in model.get_parameters() for n in p.output(0).get_names()}
            extra = [n for n in names if n in present and n not in parameters]
            if extra:
                model.add_outputs(extra)
            self._compiled = (key, self._core.compile_model(model, "CPU", self._properties))
        compiled = self._compiled[1]
        request = compiled.create_infer_request()
        request.infer({k: _plain(v) for k, v in feeds.items()})
        values = {}
        for port in compiled.outputs:
            value = request.get_tensor(port).data.copy()
            for name in port.get_names():
                values[name] = value
        return {**{k: v for k, v in feeds.items() if k in names}, **values}

    def local_inputs(self, tensor: str, known: set[str]) -> tuple[str, ...] | None:
        port = self._outputs.get(tensor)
        if port is None or port.get_node().get_type_name() == "Parameter":
            return None
        starts, seen, frontier, count = set(), set(), [port.get_node()], 0
        while frontier:
            node = frontier.pop()
            key = node.get_friendly_name()
            if key in seen:
                continue
            seen.add(key)
            count += 1
            if count > MAX_PIECE_OPS:
                return None
            for value in node.inputs():
                source = value.get_source_output()
                names = source.get_names() & known
                if names:
                    starts.add(sorted(names)[0])
                    continue
                parent = source.get_node()
                if parent.get_type_name() == "Parameter":
                    return None
                if parent.get_type_name() != "Constant":
                    frontier.append(parent)
        self._cuts[tensor] = tuple(sorted(starts))
        return self._cuts[tensor]

    def keep_names(self, tensor: str) -> tuple[str, ...] | None:
        """The piece's ops that read a FakeQuantize's output or INT8 weights, and those that produce
        the tensors its FakeQuantizes take: what NNCF's ignored scope takes (names the IR keeps
        from the ONNX graph; NNCF's own ops and weight decompression are left out)."""
        if tensor not in self._cuts:
            return None
        starts, names = set(self._cuts[tensor]), []
        for op in self._piece_ops(tensor):
            for value in op.inputs():
                source = value.get_source_output()
                if _quantized(source.get_node()) and "/fq_" not in op.get_friendly_name():
                    names.append(op.get_friendly_name())
                if (op.get_type_name() == "FakeQuantize" and value.get_index() == 0 and source.get_names() & starts
                        and source.get_node().get_type_name() != "Parameter"):
                    names.append(source.get_node().get_friendly_name())
        return tuple(dict.fromkeys(names)) or None

    def _piece_ops(self, tensor: str) -> list[Any]:
        starts = set(self._cuts[tensor])
        ops, seen, frontier = [], set(), [self._outputs[tensor].get_node()]
        while frontier:
            node = frontier.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            ops.append(node)
            for value in node.inputs():
                source = value.get_source_output()
                if not (source.get_names() & starts) and source.get_node().get_type_name() != "Parameter":
                    frontier.append(source.get_node())
        return ops

    def local(self, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        compiled = self._pieces.get(tensor)
        if compiled is None:
            compiled = self._pieces[tensor] = self._piece(tensor, {n: np.ndim(feeds[n]) for n in self._cuts[tensor]})
        result = compiled({name: _plain(feeds[name]) for name in self._cuts[tensor]})
        return next(iter(result.values())).copy()

    def _piece(self, tensor: str, ranks: dict[str, int]) -> Any:
        """Compile the ops between ``tensor`` and its starts alone: Parameters take the starts' place
        while the piece is built, then the IR's own connections are put back. A start whose rank the
        IR leaves open takes the rank of what it is fed."""
        import openvino as ov

        starts = self._cuts[tensor]
        parameters, rewired = [], []
        for name in starts:
            source = self._outputs[name]
            shape = source.get_partial_shape()
            if shape.rank.is_dynamic:
                shape = ov.PartialShape([-1] * ranks[name])
            parameter = ov.opset13.parameter(shape, source.get_element_type(), name=name)
            parameters.append(parameter)
            for target in list(source.get_target_inputs()):
                rewired.append((target, source))
                target.replace_source_output(parameter.output(0))
        try:
            model = ov.Model([self._outputs[tensor]], parameters, f"piece-{tensor}")
            return self._core.compile_model(model, "CPU", self._properties)
        finally:
            for target, source in rewired:
                target.replace_source_output(source)

    def close(self) -> None:
        self._compiled, self._pieces = None, {}


def _plain(array: np.ndarray) -> np.ndarray:
    """A contiguous array of numpy's canonical type for its dtype: OpenVINO refuses ``longlong``
    ('q', what ONNX Runtime returns for int64) though it is the same type as ``int64`` ('l')."""
    array = np.asarray(array)
    if array.dtype.char != np.dtype(array.dtype.name).char:
        array = array.astype(np.dtype(array.dtype.name))
    return np.ascontiguousarray(array)


def _quantized(node: Any) -> bool:
    """A FakeQuantize, or the last op of an INT8 weight's decompression (Convert from i8/u8, then
    Subtract and Multiply by its scale)."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    while kind in ("Multiply", "Subtract", "Convert", "Reshape"):
        if kind == "Convert" and node.input(0).get_element_type().get_type_name() in ("i8", "u8"):
            return True
        node = node.input_value(0).get_node()
        kind = node.get_type_name()
    return False
