"""ONNX Runtime targets: ``ort-fp32`` and ``ort-int8``.

INT8 schemes (``--int8-scheme``):
- ``static``: calibrated Q/DQ, activations uint8 and weights int8 per channel (U8S8, the fast
  path on AVX2), with ONNX Runtime's MinMax, Entropy or Percentile calibration. Best for CNNs.
- ``dynamic``: weights int8 per channel, activation ranges computed per batch at run time,
  reduced range (7-bit weights) so AVX2's u8*s8 pairwise adds cannot saturate.
- ``weights``: weight-only int8 (symmetric, per output channel) stored as DequantizeLinear on
  the initializers; compute stays FP32. Smallest accuracy loss, 4x smaller weights on disk. The
  engine carries ``session_options.json`` turning off ONNX Runtime's QDQ fusions, so constant
  folding dequantizes the weights once at load instead of on every run (FP32 speed, not 0.6x).

Accuracy recovery (static INT8): the nodes that add the most error are kept in FP32, see
``OnnxRuntimeBackend.recover``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from optimize.calibration import Samples
from optimize.errors import BuildError
from optimize.specs import TensorSpec
from optimize.targets.base import (INT8_SCHEMES, Backend, BuildConfig, BuildInputs, Engine, RecoveryContext, Runner,
                                   RunnerConfig, TritonEntry)

ENGINE_FILE = "model.onnx"
SESSION_OPTIONS_FILE = "session_options.json"
RECOVERY_BUDGET_S = 300.0
SENSITIVITY_SAMPLES = 32
QUANTIZABLE = ("Conv", "MatMul", "Gemm")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: an ``.onnx`` graph (FP32, Q/DQ INT8 or weight-only INT8) run by an InferenceSession."""

    name = "onnxruntime"
    modules = ("optimize.targets.onnxruntime", "optimize.targets.base", "optimize.passes.weight_only",
               "optimize.passes.ort_calibration", "optimize.calibration", "optimize.factory", "optimize.specs", "optimize.errors",
               "optimize.validate")
    triton = TritonEntry(platform="onnxruntime_onnx", backend="onnxruntime", default_model_filename=ENGINE_FILE,
                         files=(ENGINE_FILE,))

    def check_config(self, config: BuildConfig) -> None:
        if config.precision not in ("fp32", "int8"):
            raise BuildError(f"ONNX Runtime targets build fp32 or int8, not {config.precision}")
        if config.precision == "int8" and config.int8_scheme not in (None, *INT8_SCHEMES):
            raise BuildError(f"unknown --int8-scheme {config.int8_scheme!r}")

    def build(self, inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, workdir: Path) -> Engine:
        """Write ``workdir/model.onnx`` for the requested precision and scheme."""
        self.check_config(config)
        workdir.mkdir(parents=True, exist_ok=True)
        target = workdir / ENGINE_FILE
        if config.precision == "fp32":
            shutil.copyfile(inputs.onnx, target)
            return Engine([ENGINE_FILE], {"graph": "fp32"})
        scheme = config.int8_scheme or "static"
        if scheme == "static":
            if calibration is None:
                raise BuildError("static INT8 needs calibration data: pass --calib")
            return Engine([ENGINE_FILE], {"scheme": scheme, **_quantize_static(inputs.onnx, config, calibration, target)})
        if scheme == "dynamic":
            return Engine([ENGINE_FILE], {"scheme": scheme, **_quantize_dynamic(inputs.onnx, config, target)})
        from optimize.passes.weight_only import quantize_weights

        details = quantize_weights(inputs.onnx, target, config.keep_fp32)
        entries = {"session.disable_quant_qdq": "1"}
        (workdir / SESSION_OPTIONS_FILE).write_text(json.dumps(entries, indent=2))
        return Engine([ENGINE_FILE, SESSION_OPTIONS_FILE], {"scheme": scheme, "session_config": entries, **details})

    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> "OnnxRuntimeRunner":
        return OnnxRuntimeRunner(folder, config)

    def recover(self, context: RecoveryContext) -> dict[str, Any] | None:
        """Keep the most sensitive Conv/MatMul/Gemm nodes in FP32, in growing steps (1, 2, 4, ...)
        until the gate passes or the time budget runs out. Nodes are ranked by the error each adds
        over its inputs on held-out samples."""
        if context.config.int8_scheme != "static":
            return None
        count = min(SENSITIVITY_SAMPLES, len(context.held_out))
        feeds = list(context.held_out.take(np.arange(count)).batches(8))
        ranking = sensitivity_ranking(context.inputs.onnx, context.built / ENGINE_FILE, feeds)
        deadline = time.monotonic() + RECOVERY_BUDGET_S
        best = None
        k = 1
        while k <= len(ranking) and time.monotonic() < deadline:
            keep = tuple(name for name, _ in ranking[:k])
            trial = dataclasses.replace(context.config, keep_fp32=keep)
            folder, result = context.build(trial, "keep")
            evaluation, settings = context.evaluate(folder)
            context.say(f"kept {k} node(s) in FP32: {evaluation['gate']['message']}")
            best = {**result, **evaluation, "cache_folder": str(folder), "runner_settings": settings,
                    "build_config": trial.to_json(),
                    "recovery": {"method": "exclude most sensitive nodes", "kept_fp32": list(keep),
                                 "candidates": len(ranking)}}
            if evaluation["gate"]["passed"]:
                return best
            k *= 2
        return best

    def triton_notes(self, folder: Path) -> list[str]:
        options = folder / SESSION_OPTIONS_FILE
        if not options.is_file():
            return []
        return [f"the engine sets ONNX Runtime session options ({options.read_text().strip()}) that Triton's "
                f"onnxruntime backend does not take; expect it to run slower there"]


BACKEND = OnnxRuntimeBackend()


def _quantize_static(onnx_path: Path, config: BuildConfig, calibration: Samples, target: Path) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from optimize.passes.ort_calibration import calibration_method, calibration_reader

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # ONNX Runtime's pre-processing is an optimisation; quantize the plain graph instead
            shutil.copyfile(onnx_path, prepared)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibMovingAverage": False}
        if config.calib_method == "percentile":
            extra["CalibPercentile"] = 99.99
        reader = calibration_reader(calibration, config.calib_batch_size, "calibrating ort-int8")
        try:
            quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                            per_channel=config.per_channel, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(config.keep_fp32) or None,
                            calibrate_method=calibration_method(config.calib_method), extra_options=extra)
        except Exception as exc:  # ONNX Runtime's quantizer refused the graph (--debug shows why)
            raise BuildError(f"ONNX Runtime static quantization failed: {exc}") from exc
    return {"format": "QDQ", "activations": "uint8 asymmetric", "weights": "int8 symmetric",
            "per_channel": config.per_channel, "calib_method": config.calib_method,
            "calib_samples": len(calibration), "kept_fp32": list(config.keep_fp32)}


def _quantize_dynamic(onnx_path: Path, config: BuildConfig, target: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(onnx_path), str(target), per_channel=config.per_channel,
                         reduce_range=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         nodes_to_exclude=list(config.keep_fp32) or None)
    except Exception as exc:  # ONNX Runtime's quantizer refused the graph (--debug shows why)
        raise BuildError(f"ONNX Runtime dynamic quantization failed: {exc}") from exc
    return {"weights": "int8 reduced range", "activations": "uint8, ranges per batch at run time",
            "per_channel": config.per_channel, "kept_fp32": list(config.keep_fp32)}


def sensitivity_ranking(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """(node name, error it adds) for quantized nodes, worst first."""
    import onnx
    import onnxruntime as ort

    fp32 = onnx.load(str(fp32_path))
    nodes = [n for n in fp32.graph.node if n.op_type in QUANTIZABLE]
    produced_by = {o: n for n in fp32.graph.node for o in n.output}
    tensors = sorted({n.output[0] for n in nodes})

    def outputs_of(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        existing = {o.name for o in model.graph.output}
        available = {o for n in model.graph.node for o in n.output}
        for name in tensors:
            if name in available and name not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name in tensors]
        collected: dict[str, list] = {n: [] for n in names}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                collected[name].append(value)
        return {k: np.concatenate(v) for k, v in collected.items()}

    ref, got = outputs_of(fp32_path), outputs_of(int8_path)

    def error(name: str) -> float:
        if name not in ref or name not in got:
            return 0.0
        r, g = ref[name].astype(np.float64), got[name].astype(np.float64)
        return float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12))

    def upstream_error(node) -> float:
        # Error already present at the node's input: nearest tracked producers upstream.
        seen, frontier, worst = set(), list(node.input), 0.0
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in ref:
                worst = max(worst, error(name))
            elif name in produced_by:
                frontier.extend(produced_by[name].input)
        return worst

    ranked = [(n.name, error(n.output[0]) - upstream_error(n)) for n in nodes]
    return sorted(ranked, key=lambda item: item[1], reverse=True)


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session with fixed thread settings."""

    def __init__(self, engine_dir: Path, config: RunnerConfig = RunnerConfig()):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        extra = Path(engine_dir) / SESSION_OPTIONS_FILE
        self._session_config = json.loads(extra.read_text()) if extra.is_file() else {}
        for key, value in self._session_config.items():
            options.add_session_config_entry(key, str(value))
        if not config.idle_spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(Path(engine_dir) / ENGINE_FILE), options,
                                             providers=providers)
        self._config = config
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results))

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "providers": self._session.get_providers(),
                "intra_op_num_threads": self._config.threads or "default (physical cores)",
                "inter_op_num_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL",
                "session_config": self._session_config, "idle_spin": self._config.idle_spin}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    names = tuple(d if isinstance(d, str) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type), names)
