"""TensorRT targets ``trt-fp16`` and ``trt-int8`` on the TensorRT 11 API.

TensorRT 11 networks are strongly typed: no FP16/INT8 builder flags, no INT8 calibrators. The
precision is put into the ONNX graph first (``optimize.passes.precision``), then built as is:

- ``trt-fp16``: the graph converted to FP16, sensitive ops kept FP32 (``model.onnx``).
- ``trt-int8``: symmetric INT8 Q/DQ from our own calibration (``model.qdq.onnx``, FP32 elsewhere,
  runs on ONNX Runtime for checking), then everything not quantized turned to FP16 (``model.onnx``).

The engine (``model.plan``) has one optimization profile over the batch axis (min/opt/max from
``--batch-sizes``), a workspace limit, and a timing cache kept in the bundle's cache folder and
reused by later builds. ``engine.json`` records the GPU and TensorRT version: an engine only runs
on that pair, and loading it elsewhere says so and how to rebuild.

``TensorRTRunner`` runs an engine with device buffers (cuda-python) on its own CUDA stream, any
batch inside the profile, tensors by name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from optimize import atomic
from optimize.inputs.calibration import Samples
from optimize.errors import BuildError, BundleError
from optimize.passes.precision import fp16_graph, graph_report, qdq_graph, to_opset
from optimize.inputs.specs import TensorSpec
from optimize.targets.base import Backend, BuildConfig, BuildInputs, Engine, Runner, RunnerConfig, TritonEntry
from optimize.targets.coverage import Coverage, Layer, product

GRAPH_FILE = "model.onnx"  # what TensorRT builds: FP16, or Q/DQ + FP16
QDQ_FILE = "model.qdq.onnx"  # trt-int8 only: FP32 with Q/DQ, for checks on any machine
ENGINE_FILE = "model.plan"
RECORD_FILE = "engine.json"
WORKSPACE_BYTES = int(os.environ.get("OPTIMIZE_TRT_WORKSPACE_MB", "4096")) << 20


def prepare_graph(onnx_path: Path, config: BuildConfig, calibration: Samples | None, out_dir: Path) -> dict:
    """Write the typed graph TensorRT will build; everything here runs without a GPU."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.precision == "fp16":
        return {"fp16": fp16_graph(onnx_path, out_dir / GRAPH_FILE, calibration, config.keep_fp32)}
    BACKEND.check_config(config)
    qdq = qdq_graph(onnx_path, out_dir / QDQ_FILE, calibration, config.calib_method, config.calib_batch_size,
                    config.keep_fp32)
    with tempfile.TemporaryDirectory() as tmp:
        upgraded = Path(tmp) / "qdq19.onnx"
        to_opset(out_dir / QDQ_FILE, upgraded)
        fp16 = fp16_graph(upgraded, out_dir / GRAPH_FILE, calibration, config.keep_fp32)
    return {"qdq": qdq, "fp16": fp16}


def profile_shapes(graph: Path, calibration: Samples | None, batch_sizes: tuple[int, ...],
                   max_sequence_length: int | None = None) -> dict[str, list]:
    """min/opt/max shapes per input: the batch axis spans ``batch_sizes``, other axes as exported
    (or as the calibration data has them, where the graph leaves them open). With
    ``max_sequence_length``, the open sequence axis of a token input spans 1 to it, tuned at the
    calibration data's length."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    low, high = min(batch_sizes), max(batch_sizes)
    opt = sorted(batch_sizes)[len(batch_sizes) // 2]
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis == 0:
                dims.append(None)
            elif dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
            elif calibration is not None and value.name in calibration.arrays:
                dims.append(int(calibration.arrays[value.name].shape[axis]))
            else:
                raise BuildError(f"input '{value.name}' has an open axis {axis}; TensorRT needs its size "
                                 f"(give calibration data with --calib)")
        shapes[value.name] = [[b, *dims[1:]] for b in (low, opt, high)]
        sequence = value.type.tensor_type.shape.dim[1] if len(dims) == 2 else None
        if max_sequence_length and sequence is not None and not sequence.HasField("dim_value"):
            data_length = min(dims[1], max_sequence_length)
            for shape, length in zip(shapes[value.name], (1, data_length, max_sequence_length)):
                shape[1] = length
    return shapes


class TensorRTBackend(Backend):
    """TensorRT 11 on an NVIDIA GPU: a strongly typed engine (``model.plan``) from a typed ONNX graph."""

    name = "tensorrt"
    modules = ("optimize.targets.tensorrt", "optimize.targets.base", "optimize.targets.coverage", "optimize.passes.precision",
               "optimize.passes.ort_calibration", "optimize.passes.weight_only", "optimize.inputs.calibration", "optimize.inputs.factory",
               "optimize.inputs.specs", "optimize.errors", "optimize.atomic", "optimize.validate", "optimize.quiet")
    triton = TritonEntry(platform="tensorrt_plan", backend="tensorrt", default_model_filename=ENGINE_FILE,
                         files=(ENGINE_FILE,), kind="KIND_GPU")
    fixed_batch_profile = True
    needs_gpu_to_serve = True

    def check_config(self, config: BuildConfig) -> None:
        if config.precision not in ("fp16", "int8"):
            raise BuildError(f"TensorRT targets build fp16 or int8, not {config.precision}")

    def build(self, inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, workdir: Path) -> Engine:
        """The typed graph (``prepare_graph``), then the engine over the batch profile of ``--batch-sizes``."""
        self.check_config(config)
        return _build(inputs, config, calibration, workdir)

    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> "TensorRTRunner":
        return TensorRTRunner(folder, config)


def _build(inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, out_dir: Path) -> Engine:
    details = prepare_graph(inputs.onnx, config, calibration, out_dir)
    shapes = profile_shapes(out_dir / GRAPH_FILE, calibration, config.batch_sizes, config.max_sequence_length)
    record = build_engine(out_dir / GRAPH_FILE, out_dir / ENGINE_FILE, shapes, inputs.timing_cache)
    (out_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
    files = [ENGINE_FILE, RECORD_FILE, GRAPH_FILE] + ([QDQ_FILE] if config.precision == "int8" else [])
    report = graph_report(out_dir / GRAPH_FILE)
    return Engine(files, {**details, **record, "graph_ops": report["ops"]})


def build_engine(graph: Path, plan_path: Path, shapes: dict[str, list], timing_cache: Path | None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> dict[str, Any]:
    """Parse the typed ONNX graph and build a serialized engine (strongly typed: TensorRT 11)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # every network is strongly typed in TensorRT 11
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {graph.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # Layer names, formats, weights and tactics kept in the engine: its inspector reads them back.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build an engine from {graph.name} (see the messages above)")
    plan_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        atomic.write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, **gpu_identity(), "profile": shapes, "workspace_bytes": workspace_bytes,
            "timing_cache": {"path": str(timing_cache) if timing_cache else None, "reused": bool(cache_bytes)}}


def gpu_identity(device: int = 0) -> dict[str, str]:
    """The GPU an engine is built for: name and compute capability."""
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(device)
    _check(err, "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def compatibility_problem(record: dict[str, Any], here: dict[str, str]) -> str | None:
    """Why an engine recorded as ``record`` cannot run where ``here`` (TensorRT version, GPU) describes."""
    problems = []
    built_trt, here_trt = str(record.get("tensorrt", "?")), str(here.get("tensorrt", "?"))
    if built_trt.split(".")[:3] != here_trt.split(".")[:3]:
        problems.append(f"TensorRT {built_trt} built it, this machine has TensorRT {here_trt}")
    if record.get("compute_capability") != here.get("compute_capability"):
        problems.append(f"it was built for {record.get('gpu')} (compute capability {record.get('compute_capability')}), "
                        f"this machine has {here.get('gpu')} (compute capability {here.get('compute_capability')})")
    if not problems:
        return None
    return "; ".join(problems) + ". A TensorRT engine only runs on the GPU and TensorRT version it was built with: " \
                                 "rebuild the target on this machine (optimize build ... --target trt-...)"


def _check(err: Any, what: str) -> None:
    code = int(err[0] if isinstance(err, tuple) else err)
    if code != 0:
        raise RuntimeError(f"{what} failed with CUDA error {code}")


_FORMAT_PRECISIONS = ((re.compile(r"\bInt8\b", re.I), "int8"), (re.compile(r"\b(FP16|Half)\b"), "fp16"),
                      (re.compile(r"\bBF16\b"), "bf16"), (re.compile(r"\bFP8\b"), "fp8"),
                      (re.compile(r"\b(FP32|Float)\b"), "fp32"))
_WEIGHT_PRECISIONS = {"Int8": ("int8", 1), "Half": ("fp16", 2), "Float": ("fp32", 4), "BFloat16": ("bf16", 2),
                      "FP8": ("fp8", 1), "Int4": ("int4", 0.5)}


def _format_precision(text: str) -> str:
    return next((precision for pattern, precision in _FORMAT_PRECISIONS if pattern.search(text)), text)


def inspector_layers(info: dict[str, Any]) -> tuple[list[Layer], dict[str, int]]:
    """(MAC-bearing layers, stored weight bytes by precision) from the engine inspector's JSON: a
    convolution's MACs are its output size times its weights per output map, a matrix product's its
    output size times the reduced axis; the precision is the format of its first input."""
    layers, stored = [], {}
    for layer in info.get("Layers", []):
        if isinstance(layer, str):
            raise BundleError("the engine was built without detailed profiling verbosity: its layers cannot be "
                              "read back; rebuild the target")
        for key in ("Weights", "Bias"):
            weights = layer.get(key) or {}
            precision, size = _WEIGHT_PRECISIONS.get(weights.get("Type"), (None, 0))
            if precision and weights.get("Count"):
                stored[precision] = stored.get(precision, 0) + int(weights["Count"] * size)
        inputs, outputs = layer.get("Inputs") or [], layer.get("Outputs") or []
        kind = layer.get("ParameterType") or layer.get("LayerType", "")
        if not inputs or not outputs:
            continue
        out, a = outputs[0].get("Dimensions") or [], inputs[0].get("Dimensions") or []
        if kind in ("Convolution", "Deconvolution") and layer.get("Weights", {}).get("Count"):
            count, maps = layer["Weights"]["Count"], max(int(layer.get("OutMaps") or 1), 1)
            macs = product(out) * count // maps if kind == "Convolution" else product(a) * count // max(a[1], 1)
        elif kind in ("MatrixMultiply", "Gemm") and a and out:
            macs = product(out) * (a[-1] if len(a) < 2 or len(out) < 2 or a[-2] == out[-2] else a[-2])
        else:
            continue
        precision = _format_precision(inputs[0].get("Format/Datatype", ""))
        layers.append(Layer(layer.get("Name", "?"), layer.get("LayerType", kind), precision, int(macs),
                            layer.get("TacticName")))
    return layers, stored


class TensorRTRunner(Runner):
    """A deserialized engine with its execution context, a CUDA stream and device buffers."""

    def __init__(self, engine_dir: Path, config: RunnerConfig = RunnerConfig()):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        engine_dir = Path(engine_dir)
        record = json.loads((engine_dir / RECORD_FILE).read_text())
        problem = compatibility_problem(record, {"tensorrt": trt.__version__, **gpu_identity()})
        if problem:
            raise BundleError(f"{engine_dir / ENGINE_FILE}: {problem}")
        self._cudart = cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine((engine_dir / ENGINE_FILE).read_bytes())
        if self._engine is None:
            raise BundleError(f"{engine_dir / ENGINE_FILE}: TensorRT could not load the engine; rebuild the target")
        self._context = self._engine.create_execution_context()
        err, self._stream = cudart.cudaStreamCreate()
        _check(err, "cudaStreamCreate")
        self._lock = threading.Lock()  # one context: one call at a time
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._record = record
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self._limits = {n: self._engine.get_tensor_profile_shape(n, 0) for n in names if is_input[n]}
        self.inputs = [TensorSpec(n, tuple(-1 if i == 0 else d for i, d in enumerate(self._engine.get_tensor_shape(n))),
                                  str(self._dtypes[n])) for n in names if is_input[n]]
        self.outputs = [TensorSpec(n, tuple(self._engine.get_tensor_shape(n)), str(self._dtypes[n]))
                        for n in names if not is_input[n]]
        self._config = config

    def _device(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self._cudart.cudaFree(pointer), "cudaFree")
            err, pointer = self._cudart.cudaMalloc(max(nbytes, 1))
            _check(err, "cudaMalloc")
            self._buffers[name] = (pointer, nbytes)
        return int(pointer)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            keep = []
            for spec in self.inputs:
                array = np.ascontiguousarray(feeds[spec.name], dtype=self._dtypes[spec.name])
                low, _, high = self._limits[spec.name]
                if not low[0] <= array.shape[0] <= high[0]:
                    raise ValueError(f"input '{spec.name}': batch {array.shape[0]} is outside the engine's "
                                     f"profile [{low[0]}, {high[0]}]; rebuild with --batch-sizes covering it")
                self._context.set_input_shape(spec.name, array.shape)
                pointer = self._device(spec.name, array.nbytes)
                _check(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self._stream),
                       "cudaMemcpyAsync")
                self._context.set_tensor_address(spec.name, pointer)
                keep.append(array)
            outputs = {}
            for spec in self.outputs:
                shape = tuple(self._context.get_tensor_shape(spec.name))
                host = np.empty(shape, self._dtypes[spec.name])
                self._context.set_tensor_address(spec.name, self._device(spec.name, host.nbytes))
                outputs[spec.name] = host
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError("TensorRT execution failed (see the messages above)")
            for name, host in outputs.items():
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, to_host,
                                              self._stream), "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def coverage(self, sample: dict[str, np.ndarray]) -> Coverage:
        """The engine inspector's layers at the sample's shapes (engines are built with detailed
        profiling verbosity): each layer's input format, weights and tactic."""
        import tensorrt as trt

        with self._lock:
            for spec in self.inputs:
                self._context.set_input_shape(spec.name, np.shape(sample[spec.name]))
            inspector = self._engine.create_engine_inspector()
            inspector.execution_context = self._context
            info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        layers, stored = inspector_layers(info)
        return Coverage(f"the TensorRT {trt.__version__} engine inspector (detailed profiling verbosity)", layers, stored)

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "tensorrt", "tensorrt": self._record.get("tensorrt"), "gpu": self._record.get("gpu"),
                "profile": self._record.get("profile")}

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None



BACKEND = TensorRTBackend()
