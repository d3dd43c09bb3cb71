"""Export: nn.Module -> torch.export program (.pt2) -> ONNX, each checked against the stage before.

The batch axis is dynamic in every exported artifact, and the sequence axis too for token
inputs. The ONNX file is checked with ``onnx.checker`` and run through ONNX Runtime on held-out
samples; outputs must agree with PyTorch within ``Tolerance``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimize.errors import ExportError, ParityError
from optimize.inputs.specs import TensorSpec
from optimize.quiet import quieted

if TYPE_CHECKING:
    import torch


def _quiet_exporter() -> "contextlib.AbstractContextManager[None]":
    """torch's exporters log every torchvision op they cannot register and warn about torch's own
    pytree deprecation: nothing a user can act on. Their errors still raise."""
    return quieted(loggers=("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                            "torch._dynamo", "torch._functorch"),
                   warning_messages=((FutureWarning, r".*treespec.*"),
                                     (UserWarning, r".*were assigned during export")))  # an RNN's own weights


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Elementwise bound |a - b| <= atol + rtol * |b|, as numpy.allclose."""

    atol: float
    rtol: float


# FP32 graph rewrites (fusions, reassociated reductions) move results by a few ULPs per op;
# deep models accumulate that. These are the bounds for an FP32 export of a float model.
FP32_EXPORT_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                    tolerance: Tolerance, stage: str) -> dict[str, dict[str, float]]:
    """Per-output max abs / rel error; raise ParityError naming the worst output and element."""
    report, worst = {}, None
    for name, ref in reference.items():
        if name not in candidate:
            raise ParityError(f"{stage}: output {name!r} is missing (got {sorted(candidate)})")
        got = np.asarray(candidate[name], dtype=np.float64)
        ref64 = np.asarray(ref, dtype=np.float64)
        if got.shape != ref64.shape:
            raise ParityError(f"{stage}: output {name!r} has shape {got.shape}, expected {ref64.shape}")
        error = np.abs(got - ref64)
        bound = tolerance.atol + tolerance.rtol * np.abs(ref64)
        excess = error - bound
        flat = int(np.argmax(excess)) if excess.size else 0
        entry = {"max_abs_error": float(error.max(initial=0.0)),
                 "max_rel_error": float((error / np.maximum(np.abs(ref64), 1e-12)).max(initial=0.0)),
                 "atol": tolerance.atol, "rtol": tolerance.rtol}
        report[name] = entry
        if excess.size and excess.flat[flat] > 0 and (worst is None or excess.flat[flat] > worst[0]):
            index = np.unravel_index(flat, error.shape)
            worst = (excess.flat[flat], name, index, got[index], ref64[index])
    if worst:
        _, name, index, got_v, ref_v = worst
        raise ParityError(
            f"{stage}: output {name!r} differs from PyTorch at index {tuple(int(i) for i in index)}: "
            f"{got_v:.6g} vs {ref_v:.6g} (|diff| {abs(got_v - ref_v):.3g} > atol {tolerance.atol:g} "
            f"+ rtol {tolerance.rtol:g} * |ref|)")
    return report


def torch_outputs(module: torch.nn.Module, feeds: dict[str, np.ndarray],
                  output_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a torch module on numpy feeds; outputs named ``output_names`` in order, else as the model
    names them (a dict's or a ModelOutput's fields), else ``output``/``output_i``."""
    import torch

    with torch.no_grad():
        result = module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    named = _named_outputs(result)
    names = output_names or model_output_names(named) or output_names_for(len(named))
    return {name: t.detach().float().numpy() for name, (_, t) in zip(names, named)}


def _named_outputs(result: Any, prefix: str | None = None) -> list[tuple[str | None, Any]]:
    """The output tensors in order, each with the field name the model gave it (None where unnamed):
    a dict's or a ModelOutput's keys (its None fields dropped, as its ``to_tuple`` does)."""
    import torch

    if isinstance(result, torch.Tensor):
        return [(prefix, result)]
    if isinstance(result, dict):  # transformers' ModelOutput is an OrderedDict
        return [t for k, v in result.items() if v is not None
                for t in _named_outputs(v, str(k) if prefix is None else f"{prefix}.{k}")]
    if isinstance(result, (list, tuple)):
        return [t for i, v in enumerate(result)
                for t in _named_outputs(v, None if prefix is None else f"{prefix}.{i}")]
    raise ExportError(f"model output of type {type(result).__name__} is not tensors")


def output_tensors(result: Any) -> list[Any]:
    """A model's output tensors in order (a dict's or a ModelOutput's fields flattened)."""
    return [t for _, t in _named_outputs(result)]


def model_output_names(named: list[tuple[str | None, Any]]) -> list[str] | None:
    """The model's own output names, where it names every output once."""
    names = [n for n, _ in named]
    if not names or any(n is None for n in names) or len(set(names)) != len(names):
        return None
    return [str(n) for n in names]


def output_names_for(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _dynamic_shapes(specs: list[TensorSpec]) -> tuple[dict[int, Any], ...]:
    import torch

    # DYNAMIC lets torch.export infer each axis's range (a sequence axis is bounded by the
    # position embeddings, say) and fails if the model specialises it to a constant.
    # Positional, in input order: forward's argument names need not match the input names.
    return tuple({axis: torch.export.Dim.DYNAMIC for axis, name in enumerate(spec.axis_names) if name}
                 for spec in specs)


def name_dynamic_axes(path: Path, specs: list[TensorSpec]) -> None:
    """Rename the exporter's symbolic dims (s0, s1, ...) after our axis names, everywhere."""
    import onnx

    model = onnx.load(str(path))
    renames: dict[str, str] = {}
    for value in model.graph.input:
        spec = next((s for s in specs if s.name == value.name), None)
        if spec is None:
            continue
        for dim, name in zip(value.type.tensor_type.shape.dim, spec.axis_names):
            if name and dim.dim_param:
                renames[dim.dim_param] = name
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    onnx.save(model, str(path))


def export_program(module: torch.nn.Module, example: dict[str, np.ndarray], specs: list[TensorSpec]) -> Any:
    """torch.export the module with dynamic batch (and sequence) axes."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in specs)
    try:
        # On failure torch prints the partial graph to stderr; the reason is in the error raised.
        with _quiet_exporter(), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(specs), strict=False)
    except Exception as exc:
        text = str(exc)
        if "specialized it to be a constant" in text:
            head = text.split("specialized", 1)[0]
            axis = "batch" if "batch" in head or "size()[0]" in head else "sequence"
            raise ExportError(f"torch.export failed: forward fixes the {axis} axis to the example's size "
                              f"(a len(x), int(x.shape[0]), .item() or a Python loop over it turns the size into a "
                              f"constant): use x.shape[0] or x.size(0) directly so the engine takes any batch") from exc
        raise ExportError(f"torch.export failed: {_summarise(exc)}. Models with data-dependent "
                          f"control flow need torch.cond or a fixed shape") from exc


def draft_program(module: torch.nn.Module, example: dict[str, np.ndarray], specs: list[TensorSpec]) -> Any:
    """``torch.export.draft_export``: where strict tracing gives up (a data-dependent shape, an op
    without a fake kernel), it records the problem and carries on with runtime checks."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in specs)
    try:
        with _quiet_exporter():
            return torch.export.draft_export(module, args, dynamic_shapes=_dynamic_shapes(specs))
    except Exception as exc:
        raise ExportError(f"draft export failed: {_summarise(exc)}") from exc


def _tuple_outputs(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` returning its output tensors as a flat tuple (the TorchScript exporter traces
    tuples; a dict or a ModelOutput is flattened in the order the outputs are named)."""
    import torch

    class TupleOutputs(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> tuple:
            return tuple(t for _, t in _named_outputs(self.inner(*args)))

    return TupleOutputs(module).eval()


@dataclasses.dataclass
class Exported:
    """What ``export_checked`` made: the program (None from the TorchScript-based exporter), the route
    that worked, what the check found, and why each route before it failed."""

    program: Any
    route: str
    parity: dict[str, Any]
    failed: list[str]


ROUTES = ("torch.export", "draft export", "torchscript")


def export_checked(module: Any, example: dict[str, np.ndarray], specs: list[TensorSpec], output_names: list[str],
                   path: Path, check: Any, with_program: bool = True) -> Exported:
    """Write ``path`` by the first route that exports and passes ``check(path)`` (the comparison with
    PyTorch): ``torch.export`` then the ONNX exporter on its program; ``torch.export.draft_export``
    then the same; the TorchScript-based exporter on the module. Without ``with_program`` (a
    TorchScript checkpoint) only the last applies. The first route's error is raised when none works."""
    import torch

    routes = ROUTES if with_program and not isinstance(module, torch.jit.ScriptModule) else ROUTES[2:]
    failed: list[str] = []
    first: Exception | None = None
    for route in routes:
        try:
            if route == "torch.export":
                program = export_program(module, example, specs)
            elif route == "draft export":
                program = draft_program(module, example, specs)
            else:
                program = None
            target = program if program is not None else (
                module if isinstance(module, torch.jit.ScriptModule) else _tuple_outputs(module))
            export_onnx(target, example, specs, output_names, path)
            parity = _checked(check, path)
            return Exported(program, route, parity, failed)
        except (ExportError, ParityError) as exc:
            failed.append(f"{route}: {_summarise(exc)}")
            first = first or exc
            path.unlink(missing_ok=True)
    assert first is not None
    if len(failed) > 1:
        raise type(first)(f"{first} (also tried: {'; '.join(failed[1:])})") from first
    raise first


def _checked(check: Any, path: Path) -> dict[str, Any]:
    """``check(path)``; ONNX Runtime refusing to run the file (a shape baked in at export) is a failed check."""
    try:
        return check(path)
    except ParityError:
        raise
    except Exception as exc:  # ONNX Runtime's own error on the exported file
        raise ParityError(f"the exported ONNX does not run on the held-out data: {_summarise(exc)}") from exc


def save_program(program: Any, path: Path) -> None:
    import torch

    torch.export.save(program, str(path))


def export_onnx(model: Any, example: dict[str, np.ndarray], specs: list[TensorSpec],
                output_names: list[str], path: Path, opset: int = 18) -> None:
    """Write ``path`` (single-file ONNX). ``model`` is an ExportedProgram or a ScriptModule."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[s.name])) for s in specs)
    input_names = [s.name for s in specs]
    try:
        if isinstance(model, torch.export.ExportedProgram):
            with _quiet_exporter():
                program = torch.onnx.export(model, args, None, input_names=input_names,
                                            output_names=output_names, opset_version=opset,
                                            dynamo=True, optimize=True, verbose=False)
            program.save(str(path), external_data=False)
            name_dynamic_axes(path, specs)
        else:  # TorchScript: only the TorchScript-based exporter reads it.
            axes = {s.name: {a: n for a, n in enumerate(s.axis_names) if n} for s in specs}
            axes.update({n: {0: "batch"} for n in output_names})
            with _quiet_exporter():
                torch.onnx.export(model, args, str(path), input_names=input_names,
                                  output_names=output_names, opset_version=opset, dynamo=False,
                                  dynamic_axes=axes)
    except Exception as exc:
        raise ExportError(_unsupported_message(exc, model)) from exc
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"exported ONNX fails onnx.checker: {_summarise(exc)}") from exc


_OP_PATTERNS = (re.compile(r"(aten::[A-Za-z0-9_.]+)"), re.compile(r"OpOverload\(op='([^']+)'"),
                re.compile(r"(torch\.ops\.[A-Za-z0-9_.]+)"), re.compile(r"operator ([A-Za-z0-9_:.]+)"))


def _unsupported_message(exc: BaseException, model: Any) -> str:
    text = str(exc)
    op = next((m.group(1) for p in _OP_PATTERNS for m in [p.search(text)] if m), None)
    if op is None:
        return f"ONNX export failed: {_summarise(exc)}"
    where = _module_path_of(model, op)
    location = f" in module {where}" if where else ""
    return (f"ONNX export failed: operator {op}{location} has no ONNX translation. Replace it with "
            f"supported ops, or register a custom translation")


def _module_path_of(model: Any, op: str) -> str | None:
    graph = getattr(model, "graph", None)
    if graph is None:
        return None
    short = op.replace("aten::", "").replace("torch.ops.", "").replace("aten.", "").split(".")[0]
    for node in graph.nodes:
        if node.op == "call_function" and short in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                return f"{path or '<root>'} ({getattr(cls, '__name__', cls)})"
    return None


def _summarise(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def onnx_outputs(path: Path, batches: Any) -> dict[str, np.ndarray]:
    """The ONNX file's outputs on ``batches`` (ONNX Runtime on the CPU, plain FP32): what the
    export is checked with, independent of any target's engine settings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches:
        for name, value in zip(names, session.run(names, batch)):
            chunks[name].append(value)
    return {name: np.concatenate(values) for name, values in chunks.items()}
