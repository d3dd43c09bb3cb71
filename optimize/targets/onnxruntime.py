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
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optimize.calibration import Samples
from optimize.errors import BuildError
from optimize.specs import TensorSpec
from optimize.targets.base import BuildConfig, Engine, Runner, RunnerConfig

ENGINE_FILE = "model.onnx"
SESSION_OPTIONS_FILE = "session_options.json"
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def build(onnx_path: Path, config: BuildConfig, calibration: Samples, out_dir: Path) -> Engine:
    """Write ``out_dir/model.onnx`` for the requested precision and scheme."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ENGINE_FILE
    if config.precision == "fp32":
        shutil.copyfile(onnx_path, target)
        return Engine([ENGINE_FILE], {"graph": "fp32"})
    if config.precision != "int8":
        raise BuildError(f"ONNX Runtime targets build fp32 or int8, not {config.precision}")
    scheme = config.int8_scheme or "static"
    if scheme == "static":
        details = _quantize_static(onnx_path, config, calibration, target)
    elif scheme == "dynamic":
        details = _quantize_dynamic(onnx_path, config, target)
    elif scheme == "weights":
        from optimize.passes.weight_only import quantize_weights

        details = quantize_weights(onnx_path, target, config.keep_fp32)
        entries = {"session.disable_quant_qdq": "1"}
        (out_dir / SESSION_OPTIONS_FILE).write_text(json.dumps(entries, indent=2))
        return Engine([ENGINE_FILE, SESSION_OPTIONS_FILE], {"scheme": scheme, "session_config": entries, **details})
    else:
        raise BuildError(f"unknown --int8-scheme {scheme!r}")
    return Engine([ENGINE_FILE], {"scheme": scheme, **details})


def _quantize_static(onnx_path: Path, config: BuildConfig, calibration: Samples, target: Path) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from tqdm import tqdm

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            total = (len(calibration) + config.calib_batch_size - 1) // config.calib_batch_size
            self._bar = tqdm(calibration.batches(config.calib_batch_size), total=total,
                             desc="calibrating ort-int8", unit="batch", leave=False)
            self._it = iter(self._bar)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantize the plain graph instead
            shutil.copyfile(onnx_path, prepared)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibMovingAverage": False}
        if config.calib_method == "percentile":
            extra["CalibPercentile"] = 99.99
        try:
            quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=config.per_channel, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(config.keep_fp32) or None,
                            calibrate_method=methods[config.calib_method], extra_options=extra)
        except Exception as exc:
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
    except Exception as exc:
        raise BuildError(f"ONNX Runtime dynamic quantization failed: {exc}") from exc
    return {"weights": "int8 reduced range", "activations": "uint8, ranges per batch at run time",
            "per_channel": config.per_channel, "kept_fp32": list(config.keep_fp32)}


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


def load_runner(engine_dir: Path, config: RunnerConfig = RunnerConfig()) -> Runner:
    return OnnxRuntimeRunner(engine_dir, config)
