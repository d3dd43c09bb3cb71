"""Which layer broke it: every layer's error in an engine against the FP32 ONNX reference.

The reference is the FP32 ONNX model (already checked against PyTorch) run by ONNX Runtime with
graph optimizations off, every intermediate tensor exposed. A row is one node of that graph that
computes (not one that only moves or reshapes data), named by the module the exporter recorded
(``pkg.torch.onnx.name_scopes``, or the TorchScript exporter's ``/encoder/layer.3/...`` node names).

An engine is probed through its Runner's ``layer_probe`` (``LayerProbe``): the engine with the
rows' tensors exposed as outputs, and each row's own piece of the engine (the ops between tensors
the reference also has, its quantizers included) run alone. Per row, two errors, each as SQNR in dB
and mean cosine over samples:
- **cumulative**: the engine's tensor against the reference's, the engine fed the model's inputs
  (where the damage shows);
- **local**: the row's piece fed the reference's own inputs (where the damage is made: quantizing
  its inputs and weights and computing in lower precision). Rankings use this one.

Exposing tensors can stop an engine from fusing (ONNX Runtime's QDQ-to-QLinear, OpenVINO's
low-precision transforms), so the instrumented engine's final outputs are compared with the
untouched engine's: ``fidelity`` says whether the two match.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# Ops that only move, reshape or index data, or compute shapes: no rows of their own.
MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "Shape", "Size", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast", "CastLike",
    "Constant", "ConstantOfShape", "Expand", "Slice", "Split", "Concat", "Range", "Equal", "Less", "Greater",
    "Not", "And", "Or", "Where", "Tile", "Pad", "Dropout", "SplitToSequence", "SequenceAt", "NonZero",
    "GatherElements", "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "QuantizeLinear",
    "DequantizeLinear", "Max", "Min", "ArgMax", "ArgMin", "TopK"})
RANK_SAMPLES = 16  # held-out samples a build's fallback ranks layers on (and its chosen engine is pictured on)
BROKEN_DB = 20.0  # a layer that alone adds noise of 1% of its output's energy (cosine about 0.995) is broken
SAME_DB = 0.5  # instrumented and untouched final SQNR within this: the probe saw the engine as it runs
SAME_COSINE = 1e-3
NOT_EXPOSED = "the engine does not expose this tensor (fused away or renamed)"


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One computing node of the reference graph."""

    node: str  # its ONNX node name
    op: str
    output: str  # the tensor compared
    depth: int  # its position in the reference graph's topological order
    module: str  # the module it comes from, as the exporter recorded it


def module_name(node: Any) -> str:
    """The innermost module path the exporter recorded for ``node`` (its name when none was)."""
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = [s for s in ast.literal_eval(scopes) if s]
        except (ValueError, SyntaxError):
            names = []
        modules = names[:-1] if len(names) > 1 else names  # the last scope is the op itself
        if modules:
            return modules[-1]
    if node.name.startswith("/"):  # TorchScript exporter: /encoder/layer.3/attention/MatMul
        return ".".join(node.name.strip("/").split("/")[:-1]) or node.name
    return node.name


def layer_rows(model: Any) -> list[LayerRow]:
    """The rows of an ONNX model (loaded), in graph order: nodes that compute a float tensor."""
    import onnx

    if not model.graph.value_info:  # the TorchScript exporter leaves the types of inner tensors out
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # types unknown: every computing node is a row
            pass
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    rows = []
    for depth, node in enumerate(model.graph.node):
        if node.op_type in MOVEMENT_OPS or not node.output or not node.output[0]:
            continue
        if types.get(node.output[0], 1) not in (1, 10, 11, 16):  # float, float16, double, bfloat16
            continue
        rows.append(LayerRow(node.name or node.output[0], node.op_type, node.output[0], depth, module_name(node)))
    return rows


class ErrorSum:
    """SQNR and mean per-sample cosine of ``got`` against ``ref``, summed over batches."""

    def __init__(self) -> None:
        self.signal = self.noise = self.cosines = 0.0
        self.count = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref = np.asarray(ref)
        rows = ref.shape[0] if ref.ndim > 1 else 1
        r, g = ref.reshape(rows, -1), np.asarray(got).reshape(rows, -1)
        def peak() -> float:
            return max(float(np.max(np.abs(r), initial=0)), float(np.max(np.abs(g), initial=0)))

        big = peak() > 1e15
        if big:  # attention masks filled with -inf or the float minimum: fills on both sides are no signal
            fill = ((r == g) | ((np.abs(r) > 1e15) & (np.abs(g) > 1e15) & (np.sign(r) == np.sign(g)))) & ~(np.abs(r) <= 1e15)
            r, g = np.where(fill, 0, r), np.where(fill, 0, g)
            big = peak() > 1e15
        kind = np.float64 if big or r.dtype == np.float64 else np.float32
        r, g = r.astype(kind, copy=False), g.astype(kind, copy=False)
        d = r - g
        rr, gg = np.einsum("ij,ij->i", r, r), np.einsum("ij,ij->i", g, g)
        rg, dd = np.einsum("ij,ij->i", r, g), np.einsum("ij,ij->i", d, d)
        self.signal += float(np.sum(rr, dtype=np.float64))
        self.noise += float(np.sum(dd, dtype=np.float64))
        norms = np.sqrt(rr.astype(np.float64) * gg.astype(np.float64))
        cos = np.where(norms > 0, rg / np.maximum(norms, 1e-300), np.where((rr == 0) & (gg == 0), 1.0, 0.0))
        self.cosines += float(np.sum(np.clip(cos, -1.0, 1.0)))
        self.count += rows

    @property
    def sqnr_db(self) -> float | None:
        """None: no error at all (the engine matched exactly)."""
        if self.noise == 0:
            return None
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        return self.cosines / self.count if self.count else float("nan")

    def to_json(self) -> dict[str, Any]:
        sqnr = self.sqnr_db
        return {"sqnr_db": None if sqnr is None else round(max(sqnr, -999.0), 3),
                "cosine": round(self.cosine, 6), "exact": sqnr is None}


def sqnr_key(error: dict[str, Any] | None) -> float:
    """Sort key of an error record: lower means more error (exact sorts last)."""
    if not error:
        return math.inf
    return math.inf if error.get("exact") else float(error["sqnr_db"])


class LayerProbe(abc.ABC):
    """An engine opened so that its intermediate tensors can be read and its pieces run alone."""

    def expect(self, rows: list[LayerRow]) -> None:
        """The rows about to be measured (which op the reference says made each tensor)."""

    @abc.abstractmethod
    def tensors(self) -> set[str]:
        """The tensor names the engine can expose."""

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The engine run on ``feeds`` with ``names`` exposed: those tensors and its own outputs."""

    @abc.abstractmethod
    def local_inputs(self, tensor: str, known: set[str]) -> tuple[str, ...] | None:
        """The tensors (all in ``known``) that the piece of the engine computing ``tensor`` starts
        from; None when it cannot be cut out."""

    @abc.abstractmethod
    def local(self, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """``tensor`` computed by its piece of the engine alone, fed ``feeds``."""

    def keep_names(self, tensor: str) -> tuple[str, ...] | None:
        """The names by which this backend's build keeps the piece computing ``tensor`` in float
        (its quantized ops); None when nothing in it is quantized."""
        return None

    def close(self) -> None:
        """Release what the probe compiled."""


class ReferenceModel:
    """The FP32 ONNX model under ONNX Runtime, graph optimizations off, tensors exposed on request."""

    def __init__(self, onnx_path: Path, names: Iterable[str], threads: int | None = None):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(onnx_path))
        existing = {o.name for o in model.graph.output}
        produced = {o for n in model.graph.node for o in n.output}
        for name in names:
            if name in produced and name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                existing.add(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(self.names, self.session.run(self.names, feeds)))
        return {**values, **feeds}


@dataclasses.dataclass
class EngineLayers:
    """One engine's per-layer errors (``to_json`` is what reports and manifests keep)."""

    rows: list[LayerRow]
    cumulative: dict[str, ErrorSum]
    local: dict[str, ErrorSum]
    missing: dict[str, str]  # row node -> why there is no number
    final_probed: dict[str, ErrorSum]
    final_untouched: dict[str, ErrorSum]
    samples: int
    # row node -> the ops that keep it in float in the engine's backend (``LayerProbe.keep_names``)
    keep: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def fidelity(self) -> dict[str, Any]:
        """Whether the instrumented engine's final outputs carry the untouched engine's error."""
        outputs = {}
        same = True
        for name, untouched in self.final_untouched.items():
            probed = self.final_probed.get(name)
            if probed is None:
                continue
            a, b = untouched.to_json(), probed.to_json()
            close = (abs(sqnr_key(a) - sqnr_key(b)) <= SAME_DB if math.isfinite(sqnr_key(a)) and math.isfinite(sqnr_key(b))
                     else sqnr_key(a) == sqnr_key(b)) or abs(a["cosine"] - b["cosine"]) <= SAME_COSINE / 10
            same = same and close
            outputs[name] = {"untouched": a, "instrumented": b, "same": close}
        message = ("the instrumented engine's outputs carry the untouched engine's error" if same else
                   "exposing the tensors changed the engine (a fusion it no longer makes): its layer errors "
                   "describe the instrumented engine, not exactly the one that runs")
        return {"same": same, "outputs": outputs, "message": message}

    def ranking(self, nodes: set[str] | None = None) -> list[tuple[str, float]]:
        """(row node, local SQNR dB) worst first, over the rows with a local error whose node, or one
        of the ops that keep it in float (``keep``), is in ``nodes`` (every such row when None)."""
        found = [(row.node, sqnr_key(self.local[row.node].to_json())) for row in self.rows
                 if row.node in self.local and (nodes is None or row.node in nodes
                                                or set(self.keep.get(row.node, ())) & nodes)]
        return sorted(found, key=lambda item: item[1])

    def ranked_groups(self, candidates: list[str]) -> list[tuple[str, float, tuple[str, ...]]]:
        """(row node, local SQNR dB, the ``candidates`` that keep it in float), worst row first; a
        name goes with the first row that needs it; candidates no row accounts for come last, one
        each, with no error (nan)."""
        wanted, out, seen = set(candidates), [], set()
        for node, db in self.ranking(wanted):
            names = tuple(n for n in dict.fromkeys((node, *self.keep.get(node, ()))) if n in wanted and n not in seen)
            if names:
                seen.update(names)
                out.append((node, db, names))
        return out + [(name, float("nan"), (name,)) for name in candidates if name not in seen]

    def to_json(self, precision: dict[str, str] | None = None) -> dict[str, Any]:
        precision = precision or {}
        layers = []
        for row in self.rows:
            entry = {"node": row.node, "module": row.module, "op": row.op, "depth": row.depth,
                     "tensor": row.output, "precision": precision.get(row.node)}
            if row.node in self.cumulative:
                entry["cumulative"] = self.cumulative[row.node].to_json()
            if row.node in self.local:
                entry["local"] = self.local[row.node].to_json()
            if row.node in self.missing:
                entry["missing"] = self.missing[row.node]
            layers.append(entry)
        return {"samples": self.samples, "fidelity": self.fidelity(), "layers": layers}


def measure(reference_onnx: Path, probe: LayerProbe, batches: Iterable[dict[str, np.ndarray]],
            untouched: Any | None = None, rows: list[LayerRow] | None = None,
            local_nodes: set[str] | None = None, threads: int | None = None) -> EngineLayers:
    """Every row's cumulative and local error in ``probe``'s engine over ``batches`` of held-out inputs.
    ``untouched``: the engine's own Runner, for the fidelity check. ``local_nodes``: compute local
    errors only for these rows (all when None)."""
    import onnx

    rows = rows if rows is not None else layer_rows(onnx.load(str(reference_onnx), load_external_data=False))
    probe.expect(rows)
    exposed = probe.tensors()
    missing = {r.node: NOT_EXPOSED for r in rows if r.output not in exposed}
    shown = [r for r in rows if r.output in exposed]
    known_tensors = {r.output for r in rows} | _reference_tensors(reference_onnx)
    pieces: dict[str, tuple[str, ...]] = {}
    for row in shown:
        if local_nodes is not None and row.node not in local_nodes:
            continue
        inputs = probe.local_inputs(row.output, known_tensors - {row.output})
        if inputs is None:
            missing[row.node] = "its piece of the engine cannot be run alone"
        else:
            pieces[row.node] = inputs
    needed = {r.output for r in shown} | {name for inputs in pieces.values() for name in inputs}
    reference = ReferenceModel(reference_onnx, needed, threads)
    cumulative = {r.node: ErrorSum() for r in shown}
    local = {node: ErrorSum() for node in pieces}
    final_probed: dict[str, ErrorSum] = {}
    final_untouched: dict[str, ErrorSum] = {}
    samples = 0
    by_node = {r.node: r for r in rows}
    for feeds in batches:
        ref = reference.run(feeds)
        got = probe.run(feeds, [r.output for r in shown])
        samples += len(next(iter(feeds.values())))
        for row in shown:
            if row.output in got and row.output in ref:
                cumulative[row.node].add(ref[row.output], got[row.output])
        outputs = untouched.infer(feeds) if untouched is not None else {}
        for name, value in outputs.items():
            if name in ref:
                final_untouched.setdefault(name, ErrorSum()).add(ref[name], value)
                if name in got:
                    final_probed.setdefault(name, ErrorSum()).add(ref[name], got[name])
        for node, inputs in list(pieces.items()):
            row = by_node[node]
            try:
                value = probe.local(row.output, {name: ref[name] for name in inputs})
            except Exception as exc:  # the backend refused the piece alone: say so for this layer
                missing[node] = f"its piece of the engine did not run alone: {str(exc).strip().splitlines()[-1][:160]}"
                pieces.pop(node)
                local.pop(node)
                continue
            local[node].add(ref[row.output], value)
    keep = {node: names for node in pieces for names in [probe.keep_names(by_node[node].output)] if names}
    return EngineLayers(rows, cumulative, local, missing, final_probed, final_untouched, samples, keep)


def engine_layers(backend: Any, folder: Path, runner_config: Any, reference_onnx: Path, samples: Any,
                  local_nodes: set[str] | None = None, limit: int = RANK_SAMPLES) -> EngineLayers | None:
    """``measure`` on the engine in ``folder`` opened by ``backend``'s Runner, over the first ``limit``
    of ``samples`` (a ``Samples``); None when the backend cannot expose tensors."""
    count = min(limit, len(samples))
    batches = list(samples.take(np.arange(count)).batches(8))
    with backend.runner(folder, runner_config) as runner:
        probe = runner.layer_probe()
        if probe is None:
            return None
        try:
            result = measure(reference_onnx, probe, batches, untouched=runner, local_nodes=local_nodes,
                             threads=getattr(runner_config, "threads", None))
        finally:
            probe.close()
    return result


def _reference_tensors(onnx_path: Path) -> set[str]:
    """Every tensor the reference computes or takes (its inputs and node outputs), not its weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return ({i.name for i in model.graph.input} - weights) | {o for n in model.graph.node for o in n.output if o}


MAC_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN", "Einsum"})


def precision_by_node(rows: list[LayerRow], coverage: dict[str, Any] | None) -> dict[str, str]:
    """Each row's precision from the engine's read-back coverage, matched by the name the engine gave
    the layer: its node's (OpenVINO's ``node_Conv_3/WithoutBiases``, ONNX Runtime's fused
    ``node_Conv_3_token_7`` or ``node_fc_MatMul_quant``) or its output tensor's (ONNX Runtime's
    ``relu_nchwc``). A layer named after the activation fused into it belongs to the multiplying row
    before that activation."""
    import re

    by_name = {row.output: row for row in rows} | {row.node: row for row in rows}
    macs = [row for row in rows if row.op in MAC_OPS]
    found: dict[str, str] = {}
    for layer in (coverage or {}).get("layers") or []:
        name = str(layer.get("name", ""))
        stripped = re.sub(r"(_token_\d+|_nchwc|_quant|_MatMul)+$", "", name.split("/")[0])
        row = by_name.get(name) or by_name.get(name.split("/")[0]) or by_name.get(stripped)
        if row is None:
            continue
        if row.op not in MAC_OPS:  # named after its fused activation: the multiplying row before it
            row = next((m for m in reversed(macs) if m.depth < row.depth and m.node not in found), row)
        found.setdefault(row.node, layer.get("precision"))
    return found
