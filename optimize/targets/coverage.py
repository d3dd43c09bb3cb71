"""What an engine really computes in, read back from the engine itself.

Each backend's ``Runner.coverage(sample)`` reads its own engine into ``Layer`` rows (a layer that
multiplies and accumulates: its precision, its MACs at one sample, its kernel where the backend
names it) and the bytes of the weights it stores, by precision:

- OpenVINO: the runtime model of the engine compiled with the Runner's own properties at the
  sample's shape (``runtimePrecision``, ``primitiveType``, each input's element type).
- ONNX Runtime: the graph it optimized and its profile of one run (each executed node's op and
  input types); it does not name the instruction set: "kernel: not reported".
- TensorRT: the engine inspector (engines are built with detailed profiling verbosity).
- torch-compile: the operators of the program AOTInductor compiled, and their dtypes.

``Coverage`` sums them into the share of MACs computed in INT8, BF16/FP16 and FP32 and the share of
weight bytes stored in each; ``problem`` says when that contradicts the target's name. MACs are
counted as the engine executes them: where a layout pads channels to its block (ONNX Runtime's
NCHWc), the padded work counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ORDER = ("int8", "int4", "fp8", "fp16", "bf16", "fp32", "int32")
FLOAT_LOWER = ("fp16", "bf16")
KERNEL_NOT_REPORTED = "not reported"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer that multiplies and accumulates, as the engine runs it."""

    name: str
    op: str
    precision: str  # int8 | fp16 | bf16 | fp32 (what its inputs are computed in)
    macs: int  # at the sample the coverage was read at
    kernel: str | None = None  # the implementation, where the backend names it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "precision": self.precision, "macs": self.macs,
                **({"kernel": self.kernel} if self.kernel else {})}


@dataclasses.dataclass
class Coverage:
    """An engine's precision, layer by layer and summed."""

    read_from: str  # what the backend read it from, in words
    layers: list[Layer]
    weight_bytes: dict[str, int]  # stored weight bytes by precision
    kernels_reported: bool = True

    def macs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.precision] = out.get(layer.precision, 0) + layer.macs
        return _ordered(out)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def macs_pct(self) -> dict[str, float]:
        return _percent(self.macs())

    def weight_pct(self) -> dict[str, float]:
        return _percent(self.weight_bytes)

    def kernels(self) -> dict[str, float]:
        """Share of MACs per kernel (where the backend names them)."""
        out: dict[str, int] = {}
        for layer in self.layers:
            key = f"{layer.precision}: {layer.kernel or KERNEL_NOT_REPORTED}"
            out[key] = out.get(key, 0) + layer.macs
        return dict(sorted(_percent(out).items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict[str, Any]:
        return {"read_from": self.read_from, "macs_total": self.total_macs, "macs": self.macs(), "macs_pct": self.macs_pct(),
                "weight_bytes": _ordered(self.weight_bytes), "weight_bytes_pct": self.weight_pct(),
                "kernels": self.kernels() if self.kernels_reported else KERNEL_NOT_REPORTED,
                "layers": [layer.to_json() for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Coverage":
        return cls(data["read_from"], [Layer(**layer) for layer in data.get("layers", [])],
                   dict(data.get("weight_bytes", {})), data.get("kernels") != KERNEL_NOT_REPORTED)


def _ordered(values: dict[str, int]) -> dict[str, int]:
    return {k: values[k] for k in sorted(values, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))}


def _percent(values: dict[str, int]) -> dict[str, float]:
    total = sum(values.values())
    return {k: round(100.0 * v / total, 1) for k, v in _ordered(values).items()} if total else {}


def share(record: dict[str, Any] | None, precision: str, of: str = "macs_pct") -> float | None:
    """The percentage of MACs (or ``weight_bytes_pct``) in ``precision`` of a coverage record; None
    when the record has none to tell."""
    if not record or not record.get(of):
        return None
    return float(record[of].get(precision, 0.0))


def compute_precision(record: dict[str, Any] | None) -> str | None:
    """The precision most MACs are computed in."""
    if not record or not record.get("macs_pct"):
        return None
    return max(record["macs_pct"].items(), key=lambda kv: kv[1])[0]


def label(precision: str, scheme: str | None, record: dict[str, Any] | None = None) -> str:
    """The target's precision as people read it: weight-only INT8 is INT8 weights with float compute."""
    if precision == "int8" and scheme == "weights":
        return f"int8 weights, {compute_precision(record) or 'fp32'} compute"
    return f"{precision} ({scheme})" if scheme else precision


def summary(precision: str, scheme: str | None, record: dict[str, Any] | None) -> str:
    """One phrase: "97% of MACs in INT8"; for weight-only, "71% of weight bytes INT8"."""
    if not record:
        return "-"
    if precision == "int8" and scheme == "weights":
        return f"{_pct(share(record, 'int8', 'weight_bytes_pct'))} of weight bytes INT8"
    wanted = "int8" if precision == "int8" else precision
    if not record.get("macs_pct"):
        return "no MAC layers read"
    return f"{_exact(record, wanted)} of MACs in {wanted.upper()}"


def _pct(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}%" if value >= 1 or value == 0 else f"{value:.1g}%"


def _exact(record: dict[str, Any], precision: str) -> str:
    """The MAC share of ``precision`` from the exact counts where the record has them."""
    counts = record.get("macs") or {}
    total = sum(counts.values())
    if not total:
        return _pct(share(record, precision))
    value = 100.0 * counts.get(precision, 0) / total
    return _pct(value) if value == 0 or value >= 0.1 else "<0.1%"


def problem(precision: str, scheme: str | None, record: dict[str, Any] | None) -> str | None:
    """Why the engine is not what its target says (None: it is): an INT8 engine with nothing in INT8,
    a BF16/FP16 engine that computes mostly in FP32, an FP32 engine with layers in BF16/FP16."""
    if not record or not record.get("macs_pct"):
        return None
    macs = record["macs_pct"]
    if precision == "int8":
        if scheme == "weights":
            if not record.get("weight_bytes", {}).get("int8"):
                return "weights: no weights are stored in INT8"
            return None
        if not record.get("macs", macs).get("int8"):
            return (f"{scheme or 'int8'}: no layer computes in INT8 ({describe(macs)}); "
                    "the engine is its float graph")
        return None
    if precision in FLOAT_LOWER:
        if macs.get(precision, 0.0) < 50.0:
            return f"not {precision.upper()}: {describe(macs)}"
        return None
    if precision == "fp32":
        lower = {p: v for p, v in macs.items() if p in FLOAT_LOWER + ("int8",) and v > 0}
        if lower:
            return f"not FP32: {describe(macs)}"
    return None


def describe(pct: dict[str, float]) -> str:
    """ "97% of MACs in INT8, 3% in FP32" (a share under 0.05% shows as <0.1%)"""
    parts = [f"{_pct(v) if v else '<0.1%'} {'of MACs ' if i == 0 else ''}in {p.upper()}" for i, (p, v) in
             enumerate(sorted(pct.items(), key=lambda kv: -kv[1]))]
    return ", ".join(parts) or "no MACs"


def differences(recorded: dict[str, Any] | None, now: dict[str, Any] | None, points: float = 5.0) -> str | None:
    """How the precision read now differs from the recorded one (None: within ``points`` per precision)."""
    if not recorded or not now or not recorded.get("macs_pct") or not now.get("macs_pct"):
        return None
    before, after = recorded["macs_pct"], now["macs_pct"]
    if all(abs(before.get(p, 0.0) - after.get(p, 0.0)) <= points for p in set(before) | set(after)):
        return None
    return f"recorded {describe(before)}; here {describe(after)}"


def _weights(record: dict[str, Any]) -> str:
    return ", ".join(f"{p.upper()} {_pct(v)}" for p, v in record["weight_bytes_pct"].items()) or "none stored"


def _kernels(record: dict[str, Any]) -> str:
    kernels = record.get("kernels")
    return kernels if isinstance(kernels, str) else ", ".join(f"{k} {_pct(v)}" for k, v in kernels.items())


def brief(record: dict[str, Any]) -> str:
    """One line: MACs by precision, weight bytes by precision, kernels."""
    return f"{describe(record['macs_pct'])}; weight bytes {_weights(record)}; kernels: {_kernels(record)}"


def table(record: dict[str, Any], limit: int | None = None) -> list[str]:
    """A coverage record as text lines: the sums, then the layers (most MACs first)."""
    lines = [f"read from {record['read_from']}",
             f"MACs ({record['macs_total']:,} at one sample): {describe(record['macs_pct'])}",
             f"weight bytes: {_weights(record)}", f"kernels: {_kernels(record)}"]
    layers = sorted(record.get("layers", []), key=lambda layer: -layer["macs"])
    shown = layers if limit is None else layers[:limit]
    for layer in shown:
        lines.append(f"  {layer['precision']:5s} {layer['macs']:>14,}  {layer['op']:22s} {layer['name']}"
                     + (f"  [{layer['kernel']}]" if layer.get("kernel") else ""))
    if len(shown) < len(layers):
        lines.append(f"  ... {len(layers) - len(shown)} more layers")
    return lines


# --- helpers the backends share ----------------------------------------------------------------

def product(dims: Any) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


ONNX_PRECISIONS = {1: "fp32", 10: "fp16", 16: "bf16", 2: "int8", 3: "int8", 6: "int32"}  # TensorProto types


def onnx_weight_bytes(graph: Any) -> dict[str, int]:
    """Bytes of an ONNX graph's initializers by precision (integer shape constants left out)."""
    from onnx import TensorProto, helper

    out: dict[str, int] = {}
    for init in graph.initializer:
        precision = ONNX_PRECISIONS.get(init.data_type)
        if precision is None or (init.data_type == TensorProto.INT32 and len(init.dims) == 0):
            continue
        size = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * product(init.dims)
        out[precision] = out.get(precision, 0) + size
    return out
