"""``torch-compile``: the model compiled ahead of time by PyTorch's own compiler (AOTInductor).

The baseline users would otherwise reach for, measured beside every other target. It compiles the
bundle's ``torch.export`` program (the model after pruning) into a ``.pt2`` package with
``torch._inductor.aoti_compile_and_package``: C++ kernels on CPU, in BF16 where the CPU has native
BF16 (AVX-512 BF16, AMX-BF16, ARM BF16; ``optimize.cpu``) and FP32 elsewhere, where BF16 would be
emulated and slow; on a CUDA GPU the program is re-exported in FP16 and compiled to CUDA kernels,
the path a machine with PyTorch and CUDA but no TensorRT runs for real. The precision is recorded
on the target (``precision`` in the manifest), the name stays ``torch-compile``. The batch axis (and a token sequence axis) stays dynamic up to the largest
of ``--batch-sizes``. Needs a C++ compiler at build time; the package runs where it was compiled.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from optimize.inputs.calibration import Samples
from optimize.errors import BuildError, BundleError
from optimize.inputs.specs import TensorSpec
from optimize.passes.onnx_export import output_tensors
from optimize.quiet import quieted
from optimize.targets.base import Backend, BuildConfig, BuildInputs, Engine, Runner, RunnerConfig
from optimize.targets.coverage import Coverage, Layer

PACKAGE_FILE = "model.pt2"
RECORD_FILE = "compile.json"


def _graph_io(onnx_path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [{"name": v.name, "shape": [d.dim_value if d.HasField("dim_value") else -1
                                         for d in v.type.tensor_type.shape.dim],
               "dynamic": [axis for axis, d in enumerate(v.type.tensor_type.shape.dim) if not d.HasField("dim_value")],
               "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
              for v in graph.input if v.name not in initializers]
    return inputs, [o.name for o in graph.output]


class TorchCompileBackend(Backend):
    """PyTorch's AOTInductor: the ``torch.export`` program compiled to a ``.pt2`` package."""

    name = "torch"
    modules = ("optimize.targets.torch_compile", "optimize.quiet", "optimize.targets.base", "optimize.targets.coverage", "optimize.inputs.calibration", "optimize.inputs.factory", "optimize.inputs.specs",
               "optimize.errors", "optimize.validate", "optimize.cpu", "optimize.passes.onnx_export")
    triton = None  # Triton's PyTorch backend takes TorchScript, not an AOTInductor package
    fixed_batch_profile = True  # the package's batch axis is dynamic up to the largest of --batch-sizes

    def precision(self, config: BuildConfig) -> str:
        import torch

        return "fp16" if torch.cuda.is_available() else cpu_precision()

    def build(self, inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, workdir: Path) -> Engine:
        """Compile ``inputs.program`` (BF16 on a CPU with native BF16, else FP32; FP16 on a CUDA GPU)."""
        return _compile(inputs, config, calibration, workdir)

    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> "TorchCompileRunner":
        return TorchCompileRunner(folder, config)


def _compile(build_inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, out_dir: Path) -> Engine:
    import torch

    if build_inputs.program is None or not build_inputs.program.is_file():
        raise BuildError("torch-compile compiles the torch.export program, and this source has none "
                         "(a TorchScript checkpoint): use a state_dict or .pt2 checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = _graph_io(build_inputs.onnx)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = BACKEND.precision(config)
    try:
        with _quiet_torch():
            program = torch.export.load(str(build_inputs.program))
            if precision != "fp32":
                program = _reexport(program, inputs, calibration, max(config.batch_sizes), device, precision)
            coverage = program_coverage(program, inputs, calibration, device) if calibration is not None else None
            torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / PACKAGE_FILE))
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(f"AOTInductor could not compile the program: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    record = {"device": device, "precision": precision, "torch": torch.__version__, "inputs": inputs,
              "outputs": outputs, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
              "coverage": coverage.to_json() if coverage is not None else None}
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return Engine([PACKAGE_FILE, RECORD_FILE], record, precision=precision)


def _quiet_torch() -> "contextlib.AbstractContextManager[None]":
    """torch warns about its own pytree deprecation while it loads, copies and compiles a program,
    and logs a traceback of its fake tensors when an operator refuses a dtype (the ``BuildError``
    says it in one line): nothing a user can act on."""
    return quieted(loggers=("torch._export", "torch.export", "torch._subclasses.fake_tensor"),
                   warning_messages=((FutureWarning, r".*treespec.*"),))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cpu_precision(cpu: Any = None) -> str:
    """``bf16`` where the CPU (this one by default) runs BF16 natively, else ``fp32``."""
    from optimize.cpu import detect

    return "bf16" if (cpu or detect()).native_bf16 else "fp32"


def _dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def _reexport(program: Any, inputs: list[dict[str, Any]], calibration: Samples | None, max_batch: int,
              device: str, precision: str) -> Any:
    """Re-export the program in FP16 (GPU) or BF16 (CPU) with the same dynamic axes: every floating
    parameter and buffer cast, and every float32 the graph names (a cast to the input's dtype, a
    tensor it creates) turned to the new dtype, as ``model.to(dtype)`` before the export would have
    traced it. The sequence axis keeps the range the program allows."""
    import torch
    from torch.export import Dim

    if calibration is None:
        raise BuildError(f"torch-compile in {precision} re-exports the model and needs example inputs: pass --calib")
    dtype = _dtype(precision)
    module = program.module()
    retyped = retype_graph(module.graph, torch.float32, dtype)
    module.recompile()
    module = module.to(device).to(dtype)
    args, shapes = [], []
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    for spec in inputs:
        array = torch.from_numpy(np.ascontiguousarray(calibration.arrays[spec["name"]][:2])).to(device)
        args.append(array.to(dtype) if array.is_floating_point() else array)
        shapes.append({axis: batch if axis == 0 else Dim.AUTO for axis in spec["dynamic"]})
    try:
        exported = torch.export.export(module, tuple(args), dynamic_shapes=tuple(shapes))
    except Exception as exc:
        raise BuildError(f"re-exporting the program in {precision} failed ({retyped} float32 dtypes in the graph "
                         f"turned to {precision}): {type(exc).__name__}: {_first_line(exc)}") from exc
    return exported


def retype_graph(graph: Any, old: Any, new: Any) -> int:
    """Replace dtype ``old`` by ``new`` in every call's arguments; the number of calls changed."""
    def swap(value: Any) -> Any:
        if value is old:
            return new
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    changed = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        args, kwargs = swap(node.args), swap(node.kwargs)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    return changed


_TORCH_PRECISIONS = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int8": "int8",
                     "torch.uint8": "int8", "torch.float64": "fp64"}


def program_coverage(program: Any, inputs: list[dict[str, Any]], calibration: Samples, device: str) -> Coverage:
    """The program AOTInductor compiles, run once on one calibration sample: every operator torch's
    FLOP counter knows (matrix products, convolutions, attention) with the dtype it computed in and
    the layer (module path) it came from, and the bytes of its weights by dtype."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    module = program.module()

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.layers = "", []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
                precision = _TORCH_PRECISIONS.get(str(tensor.dtype), str(tensor.dtype)) if tensor is not None else "?"
                macs = int(formula(*args, **kwargs, out_val=out)) // 2
                self.layers.append(Layer(self.layer, str(func._overloadpacket).removeprefix("aten."), precision, macs))
            return out

    class Walk(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            stack = node.meta.get("nn_module_stack") or {}
            counter.layer = next(reversed(stack.values()))[0] if stack else node.name
            return super().run_node(node)

    counter = Count()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    args = []
    for spec in inputs:
        array = torch.from_numpy(np.ascontiguousarray(calibration.arrays[spec["name"]][:1])).to(device)
        args.append(array.to(dtype) if array.is_floating_point() else array)
    with torch.no_grad(), counter:
        Walk(module).run(*args)
    stored: dict[str, int] = {}
    for tensor in module.state_dict().values():
        precision = _TORCH_PRECISIONS.get(str(tensor.dtype))
        if precision is not None:
            stored[precision] = stored.get(precision, 0) + tensor.numel() * tensor.element_size()
    return Coverage(f"the program AOTInductor compiled (torch {torch.__version__}): each operator's dtype",
                    counter.layers, stored, kernels_reported=False)


class TorchCompileRunner(Runner):
    """An AOTInductor package loaded with ``aoti_load_package``; numpy in, float32 numpy out."""

    def __init__(self, engine_dir: Path, config: RunnerConfig = RunnerConfig()):
        import torch
        import torch._inductor

        engine_dir = Path(engine_dir)
        record = json.loads((engine_dir / RECORD_FILE).read_text())
        if record["device"] == "cuda" and not torch.cuda.is_available():
            raise BundleError(f"{engine_dir}: this torch-compile package was compiled for a CUDA GPU and this "
                              f"machine has none; rebuild the target here")
        self._threads = config.threads or max(1, os.cpu_count() or 2)
        self._threads_before = torch.get_num_threads()  # the process's own setting, restored on close
        torch.set_num_threads(self._threads)
        self._model = torch._inductor.aoti_load_package(str(engine_dir / PACKAGE_FILE))
        self._record = record
        self._dtype = _dtype(record["precision"])
        self.inputs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in record["inputs"]]
        self.outputs = [TensorSpec(n, (-1,), "float32") for n in record["outputs"]]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = []
        for spec in self._record["inputs"]:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[spec["name"]])).to(self._record["device"])
            args.append(tensor.to(self._dtype) if self._dtype is not None and tensor.is_floating_point() else tensor)
        with torch.inference_mode():
            result = self._model(*args)
        values = output_tensors(result)  # a dict or ModelOutput in its fields' order
        return {name: value.float().cpu().numpy() for name, value in zip(self._record["outputs"], values)}

    def coverage(self, sample: dict[str, np.ndarray]) -> Coverage | None:
        """What the compiled program computes in, as recorded when it was compiled (MACs at one
        calibration sample; the package's kernels are generated code, not named)."""
        recorded = self._record.get("coverage")
        return Coverage.from_json(recorded) if recorded else None

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads_before)

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "torch", "mode": "AOTInductor", "device": self._record["device"],
                "precision": self._record["precision"], "intra_op_threads": self._threads,
                "torch": self._record["torch"]}



BACKEND = TorchCompileBackend()
