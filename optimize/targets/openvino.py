"""OpenVINO targets: ``openvino-fp32``, ``openvino-bf16`` and ``openvino-int8`` (quantized with NNCF).

``openvino-fp32`` is saved with ``compress_to_fp16=False`` and compiled with an f32 inference
precision hint, so it really is FP32 on disk and at run time. ``openvino-bf16`` is the same FP32
model compiled with a bf16 inference precision hint (no calibration), recorded in the engine's
``runtime.json``; only CPUs with native BF16 (AVX-512 BF16, AMX-BF16) run it so, and a Runner that
finds OpenVINO fell back to f32 stops with that said, never serving FP32 under a BF16 name.

INT8 schemes: ``static`` (``nncf.quantize``: Q/DQ with NNCF's own placement; the transformer
model type when the model is one), ``weights`` (``nncf.compress_weights``: int8 symmetric
per-channel weights). NNCF's range estimators are min-max or quantile (``percentile``); it has no
entropy calibration and OpenVINO has no dynamic scheme: both are errors, not substitutes.

Accuracy recovery tries the other range estimators and weight granularities, then NNCF's
accuracy-controlled quantization, then every op in NNCF's ignored scope (the FP32 graph), all
judged on the selection split; the vendor cross-check of our
latency harness is OpenVINO's ``benchmark_app`` on the same files.
"""

from __future__ import annotations

import dataclasses
import json
import queue
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.inputs.calibration import Samples
from optimize.errors import BuildError
from optimize.inputs.specs import TensorSpec
from optimize.quiet import progress_off_stdout, quieted
from optimize.targets.base import (ALL_NODES, Backend, BuildConfig, BuildInputs, Engine, RecoveryContext, Runner, RunnerConfig,
                                   TritonEntry)
from optimize.targets.coverage import Coverage
from optimize.targets.layer_error import LayerProbe
from optimize.targets.openvino_runtime import ir_weight_bytes, original_macs, runtime_layers

ENGINE_FILES = ["model.xml", "model.bin"]
RUNTIME_FILE = "runtime.json"  # compile-time properties of an engine (the bf16 precision hint)
RECOVERY_BUDGET_S = 300.0


def _read(onnx_path: Path):
    import openvino as ov

    return ov.Core().read_model(str(onnx_path))


def _save(model: Any, out_dir: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=False)


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU: ``model.xml``/``model.bin`` (FP32, or INT8 by NNCF) compiled by OpenVINO."""

    name = "openvino"
    modules = ("optimize.targets.openvino", "optimize.quiet", "optimize.targets.base", "optimize.targets.coverage", "optimize.targets.openvino_runtime", "optimize.targets.openvino_layers", "optimize.targets.layer_error", "optimize.targets.candidates", "optimize.inputs.calibration", "optimize.inputs.factory", "optimize.inputs.specs",
               "optimize.errors", "optimize.validate")
    triton = TritonEntry(backend="openvino", default_model_filename="model.xml", files=tuple(ENGINE_FILES),
                         threads_parameter="INFERENCE_NUM_THREADS")

    int8_schemes = ("static", "weights")

    def recoverable(self, scheme: str) -> bool:
        return scheme in ("static",)

    def check_config(self, config: BuildConfig) -> None:
        if config.precision not in ("fp32", "bf16", "int8"):
            raise BuildError(f"OpenVINO targets build fp32, bf16 or int8, not {config.precision}")
        if config.precision == "int8":
            if config.int8_scheme == "dynamic":
                raise BuildError("openvino-int8 has no dynamic scheme; use --int8-scheme static or weights")
            if config.int8_scheme in (None, "static") and config.calib_method == "entropy":
                raise BuildError("openvino-int8 (NNCF) has no entropy calibration; use --calib-method "
                                 "minmax or percentile")

    def build(self, inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, workdir: Path) -> Engine:
        """FP32 saved uncompressed, or INT8 by ``nncf.quantize`` / ``nncf.compress_weights``."""
        return build_engine(inputs, config, calibration, workdir)

    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> "OpenVinoRunner":
        return OpenVinoRunner(folder, config)

    def recover(self, context: RecoveryContext) -> dict[str, Any] | None:
        """Static INT8 over budget: every other range estimator and weight granularity, the best
        kept; then the layers that add the most error of their own kept in FP32 (NNCF's ignored
        scope) in growing steps, ranked by the per-layer error shared with ONNX Runtime
        (``optimize.targets.layer_error``); and NNCF's accuracy-controlled quantization (it ranks and
        reverts quantizers itself) against agreement with the FP32 model. Of those within budget on
        the selection split, the one computing most of its MACs in INT8 (read back from the engine);
        last, every op in the ignored scope, which is the FP32 graph. One ``CandidateSearch``."""
        from optimize.targets.candidates import Candidate, CandidateSearch, calibration_candidates, layer_steps

        if context.config.int8_scheme != "static":
            return None
        method = ("calibration variants, then the layers adding the most error kept in FP32, and "
                  "nncf.quantize_with_accuracy_control; the one with most MACs in INT8; last, all ops ignored")
        search = CandidateSearch(context, context.budget_s or RECOVERY_BUDGET_S)
        config = context.config
        first = search.judge(Candidate("first", config, f"{config.calib_method} calibration, "
                                       f"per-{'channel' if config.per_channel else 'tensor'} weights (as built)"))
        calibrated = search.best(calibration_candidates(config, ("minmax", "percentile")))
        best = min([j for j in (first, calibrated) if j is not None], key=lambda j: j.drop)
        if best.passed:
            return search.finish(best, "the best calibration within budget on the selection split", method)
        base = best.candidate.config
        layers = context.layer_error(best.folder) if context.layer_error else None
        groups = layers.ranked_groups(sorted({n for names in layers.keep.values() for n in names})) if layers else []
        broken, steps = layer_steps(groups, base, "keep", "quantized layers (ranked by the error each adds)")
        by_rank = search.first_within([broken, *steps] if broken is not None else steps)
        control = _accuracy_control(context, base)

        def builder(inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, workdir: Path) -> Engine:
            return build_engine(inputs, config, calibration, workdir, accuracy_control=control)

        selection, _ = context.choice_data()
        controlled = search.judge(Candidate("accuracy-control", base, "NNCF accuracy control", builder,
                                            {"accuracy_control": control.max_drop, "metric": control.metric_name,
                                             "data": selection.sha256}))
        passing = [j for j in (by_rank, controlled) if j is not None and j.passed]
        if not passing:
            last = search.judge(Candidate("keep-all", dataclasses.replace(base, keep_fp32=(ALL_NODES,)),
                                          "every op in the ignored scope (the FP32 graph)"))
            passing = [last] if last is not None and last.passed else []
        shares = {id(j): _int8_share(context, j.folder) for j in passing}
        if passing:
            chosen = max(passing, key=lambda j: (shares[id(j)], -j.drop))
            reason = (f"within budget on the selection split with {shares[id(chosen)]:.0f}% of its MACs in INT8"
                      + (" (the most of the candidates within budget)" if len(passing) > 1 else ""))
        else:
            chosen = min(search.judged, key=lambda j: j.drop)
            reason = "no candidate within budget on the selection split: the smallest drop"
        return search.finish(chosen, reason, method, kept_fp32=list(chosen.candidate.config.keep_fp32),
                             ranked_layers=len(groups),
                             int8_macs_pct={j.candidate.label: round(shares[id(j)], 2) for j in passing})

    def triton_parameters(self, folder: Path) -> dict[str, str]:
        return triton_parameters(folder)

    def vendor_benchmark(self, folder: Path, shapes: str, threads: int, seconds: int) -> list[str] | str | None:
        """OpenVINO's ``benchmark_app``: synchronous, latency hint, the engine's inference precision like our Runner."""
        tool = _benchmark_app()
        if tool is None:
            return "benchmark_app is not installed (it ships with the openvino package)"
        # benchmark_app takes a thread count only without a hint: one stream is what the latency hint
        # gives a synchronous caller, so the two configurations are the same engine setup.
        hint = ["-hint", "none", "-nstreams", "1", "-nthreads", str(threads)] if threads else ["-hint", "latency"]
        return [tool, "-m", str(folder / "model.xml"), "-d", "CPU", *hint, "-api", "sync", "-t", str(seconds),
                "-shape", shapes, "-infer_precision", "bf16" if triton_parameters(folder) else "f32"]


def _benchmark_app() -> str | None:
    import shutil
    import sys

    local = Path(sys.executable).parent / "benchmark_app"
    return str(local) if local.is_file() else shutil.which("benchmark_app")


def build_engine(inputs: BuildInputs, config: BuildConfig, calibration: Samples | None, out_dir: Path,
                 accuracy_control: "AccuracyControl | None" = None) -> Engine:
    BACKEND.check_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _read(inputs.onnx)
    if config.precision == "fp32":
        _save(model, out_dir)
        return Engine(list(ENGINE_FILES), {"graph": "fp32", "weights_on_disk": "fp32"})
    if config.precision == "bf16":
        _save(model, out_dir)
        (out_dir / RUNTIME_FILE).write_text(json.dumps({"INFERENCE_PRECISION_HINT": "bf16"}, indent=2))
        return Engine([*ENGINE_FILES, RUNTIME_FILE], {"graph": "fp32", "weights_on_disk": "fp32",
                                                      "inference_precision": "bf16",
                                                      "fallback": "none: BF16 passes or fails the gate whole"})
    with quieted(loggers=("nncf",)), progress_off_stdout():
        return _nncf_engine(model, config, calibration, out_dir, accuracy_control)


def _nncf_engine(model: Any, config: BuildConfig, calibration: Samples | None, out_dir: Path,
                 accuracy_control: "AccuracyControl | None") -> Engine:
    """INT8 by NNCF: weights only, or static Q/DQ (with accuracy control when given)."""
    import nncf

    scheme = config.int8_scheme or "static"
    if scheme == "weights":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
        if not config.keep_fp32 and not ir_weight_bytes(model).get("int8"):
            raise BuildError("weights: NNCF found no weights to compress in this model")
        _save(model, out_dir)
        return Engine(list(ENGINE_FILES), {"scheme": "weights", "weights": "int8 symmetric per channel",
                                           "activations": "fp32"})
    if calibration is None:
        raise BuildError("static INT8 needs calibration data: pass --calib")
    dataset = nncf.Dataset(list(calibration.batches(1)))
    model_type = nncf.ModelType.TRANSFORMER if config.model_kind == "transformer" else None
    advanced = _advanced(config)
    details: dict[str, Any] = {"scheme": "static", "model_type": config.model_kind,
                               "calib_method": config.calib_method, "calib_samples": len(calibration),
                               "preset": "performance (symmetric)"}
    ignored = _ignored_scope(config.keep_fp32)
    if config.keep_fp32:
        details["ignored_scope"] = list(config.keep_fp32)
    try:
        if accuracy_control is None:
            model = nncf.quantize(model, dataset, subset_size=len(calibration), model_type=model_type,
                                  ignored_scope=ignored, advanced_parameters=advanced)
        else:
            model = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(accuracy_control.items), accuracy_control.validate,
                max_drop=accuracy_control.max_drop, drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(calibration), model_type=model_type, ignored_scope=ignored,
                advanced_quantization_parameters=advanced)
            details["accuracy_control"] = {"max_drop": accuracy_control.max_drop,
                                           "metric": accuracy_control.metric_name}
    except Exception as exc:  # NNCF refused the model (--debug shows why)
        raise BuildError(f"NNCF quantization failed: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    _save(model, out_dir)
    return Engine(list(ENGINE_FILES), details)


def _ignored_scope(keep_fp32: tuple[str, ...]):
    """NNCF's ignored scope for ops kept in FP32: names, or every op for ``ALL_NODES``."""
    import nncf

    if not keep_fp32:
        return None
    if ALL_NODES in keep_fp32:
        return nncf.IgnoredScope(patterns=[".*"], validate=False)
    return nncf.IgnoredScope(names=list(keep_fp32), validate=False)


def _advanced(config: BuildConfig):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimator = (RangeEstimatorParametersSet.MEAN_QUANTILE if config.calib_method == "percentile"
                 else RangeEstimatorParametersSet.MINMAX)
    return AdvancedQuantizationParameters(activations_range_estimator_params=estimator,
                                          weights_quantization_params=QuantizationParameters(
                                              per_channel=config.per_channel))


def _accuracy_control(context: RecoveryContext, config: BuildConfig) -> "AccuracyControl":
    """NNCF's accuracy control judged by agreement with the FP32 model on the selection split."""
    samples, references = context.choice_data()
    first = next(iter(references))
    reference, task = references[first], context.task
    items = list(samples.batches(1))

    def metric(outputs: list[dict[str, np.ndarray]]) -> float:
        from optimize import validate

        got = np.concatenate([next(iter(o.values())) for o in outputs])
        result = validate.metrics(task, reference[:len(got)], got)
        if task == "classify":
            return result["top1_agreement_pct"] / 100
        if task == "embed":
            return result["mean_cosine"]
        return -result["max_abs_error"]

    budget = context.max_drop if task == "regress" else context.max_drop / 100
    return AccuracyControl(items, metric, budget, f"agreement with FP32 on the {context.selection_name}")


def _int8_share(context: RecoveryContext, folder: Path) -> float:
    """Percent of the engine's MACs it computes in INT8, read back from it (0 when unknown)."""
    coverage = context.coverage(folder) if context.coverage else None
    return float(((coverage or {}).get("macs_pct") or {}).get("int8", 0.0))


class AccuracyControl:
    """NNCF's accuracy-controlled quantization: held-out items and a metric on them."""

    def __init__(self, items: list[dict[str, np.ndarray]], metric: Callable[[list[dict[str, np.ndarray]]], float],
                 max_drop: float, metric_name: str):
        self.items, self._metric, self.max_drop, self.metric_name = items, metric, max_drop, metric_name

    def validate(self, compiled_model: Any, items) -> float:
        request = compiled_model.create_infer_request()
        outputs = []
        for item in items:
            request.infer(item)
            outputs.append({o.get_any_name(): request.get_tensor(o).data.copy()
                            for o in compiled_model.outputs})
        return self._metric(outputs)


class OpenVinoRunner(Runner):
    """A compiled OpenVINO model on the CPU with fixed threads and a performance hint."""

    def __init__(self, engine_dir: Path, config: RunnerConfig = RunnerConfig(), precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        runtime = Path(engine_dir) / RUNTIME_FILE
        if runtime.is_file():
            precision = json.loads(runtime.read_text()).get("INFERENCE_PRECISION_HINT", precision)
        properties = {"PERFORMANCE_HINT": config.performance_hint,
                      "INFERENCE_PRECISION_HINT": precision}
        if config.threads:
            properties["INFERENCE_NUM_THREADS"] = config.threads
        if config.performance_hint == "THROUGHPUT" and config.streams:
            properties["NUM_STREAMS"] = config.streams
        self._core, self._properties, self._xml = core, properties, Path(engine_dir) / "model.xml"
        self._compiled = core.compile_model(str(self._xml), "CPU", properties)
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        actual = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        if precision != "f32" and precision not in actual:
            from optimize.errors import TargetUnavailable

            raise TargetUnavailable(
                f"OpenVINO runs the {precision} engine in {actual} on this CPU ({_capabilities(core)}): it has no "
                f"native {precision.upper()}; serve openvino-fp32 or openvino-int8 here")
        # One infer request per concurrent caller, reused: ``infer`` is safe from several threads.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._config = config
        self.inputs = [_spec(p) for p in self._compiled.inputs]
        self._input_dtypes = {spec.name: np.dtype(spec.dtype) for spec in self.inputs}
        self._tensor = ov.Tensor
        self.outputs = [_spec(p) for p in self._compiled.outputs]
        self._ports = [(o.get_any_name(), o) for o in self._compiled.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # Shared-memory tensors: the dict form of ``infer`` copies and converts on every call,
            # which costs more than a small model's whole inference. OpenVINO shares only writable
            # memory: a read-only array (a view of a request body) is copied.
            for name, array in feeds.items():
                array = np.ascontiguousarray(array, dtype=self._input_dtypes.get(name))
                request.set_tensor(name, self._tensor(array, shared_memory=array.flags.writeable))
            request.infer()
            return {name: request.get_tensor(port).data.copy() for name, port in self._ports}
        finally:
            self._requests.put(request)

    @property
    def settings(self) -> dict[str, Any]:
        keys = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "INFERENCE_PRECISION_HINT")
        values = {k: self._compiled.get_property(k) for k in keys}
        return {"backend": "openvino", "device": "CPU",  # precision types as OpenVINO names them: f32, bf16
                **{k: v.to_string() if hasattr(v, "to_string") else str(v) for k, v in values.items()}}

    @property
    def compiled_model(self) -> Any:
        return self._compiled

    def layer_probe(self) -> LayerProbe:
        from optimize.targets.openvino_layers import OpenVinoLayerProbe

        return OpenVinoLayerProbe(self._core, self._xml, self._properties)

    def coverage(self, sample: dict[str, np.ndarray]) -> Coverage:
        """The engine compiled with this Runner's properties at the sample's shape: its runtime
        model's layers (precision of their inputs, ``primitiveType``), and the weights the IR stores."""
        import openvino as ov

        model = self._core.read_model(str(self._xml))
        stored = ir_weight_bytes(model)
        model.reshape({name: list(np.shape(array)) for name, array in sample.items()})
        compiled = self._core.compile_model(model, "CPU", self._properties)
        return Coverage(f"OpenVINO {ov.get_version().split('-')[0]}: the runtime model of the engine compiled "
                        f"for this CPU ({self.settings['INFERENCE_PRECISION_HINT']} precision hint)",
                        runtime_layers(compiled.get_runtime_model(), original_macs(model)), stored)


_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
              "i8": "int8", "u8": "uint8", "boolean": "bool"}


def _capabilities(core: Any) -> str:
    """OpenVINO's own list of what the CPU plugin runs natively (FP32, INT8, BF16, FP16, ...)."""
    try:
        return "OpenVINO's CPU capabilities: " + ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError as exc:  # an older plugin without the property
        return f"capabilities unknown ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def triton_parameters(folder: Path) -> dict[str, str]:
    """Triton's OpenVINO backend parameters an engine needs: ``HINT_BF16`` for a bf16 engine."""
    runtime = Path(folder) / RUNTIME_FILE
    if runtime.is_file() and json.loads(runtime.read_text()).get("INFERENCE_PRECISION_HINT") == "bf16":
        return {"HINT_BF16": "YES"}
    return {}


def _spec(port: Any) -> TensorSpec:
    shape = port.get_partial_shape()
    dims = tuple(d.get_length() if d.is_static else -1 for d in shape)
    return TensorSpec(port.get_any_name(), dims, _OV_DTYPES.get(port.get_element_type().get_type_name(), "float32"))



BACKEND = OpenVinoBackend()
