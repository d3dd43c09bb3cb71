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

Accuracy recovery (static and dynamic INT8): other calibrations (static), then the quantized nodes
that add the most error kept in FP32, chosen on the selection split; see ``OnnxRuntimeBackend.recover``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from optimize.inputs.calibration import Samples
from optimize.errors import BuildError
from optimize.inputs.specs import TensorSpec
from optimize.quiet import progress_off_stdout, quieted
from optimize.targets.base import (ALL_NODES, CALIBRATION_METHODS, INT8_SCHEMES, Backend, BuildConfig, BuildInputs, Engine, RecoveryContext, Runner,
                                   RunnerConfig, TritonEntry)
from optimize.targets.coverage import Coverage, onnx_weight_bytes
from optimize.targets.layer_error import LayerProbe
from optimize.targets.ort_profile import profiled_layers

ENGINE_FILE = "model.onnx"
SESSION_OPTIONS_FILE = "session_options.json"
RECOVERY_BUDGET_S = 300.0
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8", "tensor(bool)": "bool"}

# ONNX Runtime's quantizer logs this on the root logger for every model without its own
# pre-processing metadata; the graph it quantizes is already shape-inferred and optimized here.
ORT_QUANTIZER_NOISE = (r"Please consider to run pre-processing before quantization",)
# numpy's warnings from inside the quantizer (a zero range divided by a zero scale for a constant
# tensor): the engine it writes is gated on accuracy like any other.
ORT_QUANTIZER_WARNINGS = ((RuntimeWarning, r"invalid value encountered|divide by zero|overflow encountered"),)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: an ``.onnx`` graph (FP32, Q/DQ INT8 or weight-only INT8) run by an InferenceSession."""

    name = "onnxruntime"
    modules = ("optimize.targets.onnxruntime", "optimize.quiet", "optimize.targets.base", "optimize.targets.coverage", "optimize.targets.ort_profile", "optimize.targets.ort_layers", "optimize.targets.layer_error", "optimize.targets.candidates", "optimize.passes.weight_only",
               "optimize.passes.ort_calibration", "optimize.inputs.calibration", "optimize.inputs.factory", "optimize.inputs.specs", "optimize.errors",
               "optimize.validate")
    triton = TritonEntry(platform="onnxruntime_onnx", backend="onnxruntime", default_model_filename=ENGINE_FILE,
                         files=(ENGINE_FILE,), threads_parameter="intra_op_thread_count")

    int8_schemes = INT8_SCHEMES

    def recoverable(self, scheme: str) -> bool:
        return scheme in ("static", "dynamic")

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
            details = _quantize_dynamic(inputs.onnx, config, target)
            import onnx

            if not config.keep_fp32 and not onnx_weight_bytes(onnx.load(str(target)).graph).get("int8"):
                raise BuildError("dynamic: no MatMul/Gemm weights to quantize in this model (dynamic INT8 "
                                 "quantizes MatMul, Gemm and Attention only)")
            return Engine([ENGINE_FILE], {"scheme": scheme, **details})
        from optimize.passes.weight_only import MIN_ELEMENTS, quantize_weights

        details = quantize_weights(inputs.onnx, target, config.keep_fp32)
        if not details["quantized_nodes"] and not config.keep_fp32:
            raise BuildError(f"weights: no MatMul/Gemm weights to quantize in this model (weight-only INT8 takes "
                             f"MatMul/Gemm weights and embedding tables of at least {MIN_ELEMENTS} values)")
        entries = {"session.disable_quant_qdq": "1"}
        (workdir / SESSION_OPTIONS_FILE).write_text(json.dumps(entries, indent=2))
        return Engine([ENGINE_FILE, SESSION_OPTIONS_FILE], {"scheme": scheme, "session_config": entries, **details})

    def runner(self, folder: Path, config: RunnerConfig = RunnerConfig()) -> "OnnxRuntimeRunner":
        return OnnxRuntimeRunner(folder, config)

    def recover(self, context: RecoveryContext) -> dict[str, Any] | None:
        """INT8 over budget. The nodes of the engine as built are ranked by the error each adds fed
        the FP32 model's inputs (``optimize.targets.layer_error``, on the selection split; shared
        with OpenVINO). Static: every broken layer (local SQNR under 20 dB) kept in FP32 at once;
        then every other calibration method and weight granularity, the best kept; then the worst
        layers kept in FP32 in growing steps (1, 2, 4, ... all of them, which is the FP32 graph),
        until the selection split and then the gate are within budget. Dynamic: the same steps over
        its MatMul/Gemm nodes. One ``CandidateSearch``."""
        from optimize.targets.candidates import Candidate, CandidateSearch, calibration_candidates, layer_steps

        scheme = context.config.int8_scheme
        if not self.recoverable(scheme):
            return None
        method = ("broken layers in FP32, calibration variants, then the layers adding most error kept in FP32"
                  if scheme == "static" else "the MatMul/Gemm layers adding most error kept in FP32")
        search = CandidateSearch(context, context.budget_s or RECOVERY_BUDGET_S)
        first = search.judge(Candidate("first", context.config, f"{scheme} INT8, {context.config.calib_method} "
                                       f"calibration, per-{'channel' if context.config.per_channel else 'tensor'} "
                                       f"weights (as built)" if scheme == "static" else f"{scheme} INT8 (as built)"))
        gate_passed = {}

        def within_gate(judged) -> bool:
            if judged.folder not in gate_passed:
                gate_passed[judged.folder] = context.evaluate(judged.folder)[0]["gate"]["passed"]
            return gate_passed[judged.folder]

        groups = ranked_layers(context, first.folder)
        label = "keep" if scheme == "static" else f"{scheme}-keep"
        broken, steps = layer_steps(groups, context.config, label)
        if broken is not None and scheme == "static":  # the broken layers first: calibration cannot mend them
            judged = search.judge(broken)
            if judged is not None and judged.passed and within_gate(judged):
                return search.finish(judged, "the broken layers in FP32: within budget on the selection split "
                                     "and the gate", method, **_kept(judged, groups))
        elif broken is not None:
            steps = [broken, *steps]
        calibrated = search.best(calibration_candidates(context.config, CALIBRATION_METHODS)) if scheme == "static" else None
        best = min([j for j in (first, calibrated) if j is not None], key=lambda j: j.drop)
        if best.passed and within_gate(best):
            return search.finish(best, "the best calibration within budget on the selection split", method)
        base = best.candidate.config
        steps = [dataclasses.replace(c, config=dataclasses.replace(base, keep_fp32=c.config.keep_fp32),
                                     label=c.label + ("" if base == context.config else f"-{base.calib_method}"))
                 for c in steps]
        chosen = search.first_within(steps, within_gate)
        if chosen is None or not chosen.passed:
            chosen = min(search.judged, key=lambda j: j.drop)
            reason = ("no candidate within budget on the selection split" +
                      (" before the time budget ran out" if search.skipped else "") + ": the smallest drop")
        else:
            reason = "the fewest FP32 layers within budget on the selection split and the gate"
        return search.finish(chosen, reason, method, **_kept(chosen, groups))

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

    from optimize.passes.ort_calibration import calibration_method, calibration_reader, whole_batches

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        except Exception:  # ONNX Runtime's pre-processing is an optimisation; quantize the plain graph instead
            shutil.copyfile(onnx_path, prepared)
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibMovingAverage": False}
        transformer = config.model_kind == "transformer"
        if transformer:  # MatMul/Gemm inputs only, outputs left float (see TRANSFORMER_STATIC)
            extra["OpTypesToExcludeOutputQuantization"] = list(TRANSFORMER_OPS)
        if config.calib_method == "percentile":
            extra["CalibPercentile"] = 99.99
        excluded = list(config.keep_fp32)
        if ALL_NODES in excluded:
            import onnx

            excluded = [n.name for n in onnx.load(str(prepared)).graph.node if n.name]
        if config.calib_method != "minmax":
            calibration = whole_batches(calibration, config.calib_batch_size)
        reader = calibration_reader(calibration, config.calib_batch_size, "calibrating ort-int8")
        try:  # its entropy and percentile calibrators print their progress on stdout
            with quieted(messages=ORT_QUANTIZER_NOISE, warning_messages=ORT_QUANTIZER_WARNINGS), progress_off_stdout():
                quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                                per_channel=config.per_channel, reduce_range=False,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=excluded or None,
                                op_types_to_quantize=list(TRANSFORMER_OPS) if transformer else None,
                                calibrate_method=calibration_method(config.calib_method), extra_options=extra)
        except Exception as exc:  # ONNX Runtime's quantizer refused the graph (--debug shows why)
            raise BuildError(f"ONNX Runtime static quantization failed: {exc}") from exc
    return {"format": "QDQ", "activations": "uint8 asymmetric", "weights": "int8 symmetric",
            **({"quantized": TRANSFORMER_STATIC} if transformer else {}),
            "per_channel": config.per_channel, "calib_method": config.calib_method,
            "calib_samples": len(calibration), "kept_fp32": list(config.keep_fp32)}


def _quantize_dynamic(onnx_path: Path, config: BuildConfig, target: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = list(config.keep_fp32)
    if ALL_NODES in excluded:
        import onnx

        excluded = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.name]
    excluded += [f"{name}_MatMul" for name in excluded]  # it rewrites a Gemm as a MatMul of that name first
    try:
        with quieted(messages=ORT_QUANTIZER_NOISE, warning_messages=ORT_QUANTIZER_WARNINGS):
            quantize_dynamic(str(onnx_path), str(target), per_channel=config.per_channel,
                             reduce_range=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                             nodes_to_exclude=excluded or None)
    except Exception as exc:  # ONNX Runtime's quantizer refused the graph (--debug shows why)
        raise BuildError(f"ONNX Runtime dynamic quantization failed: {exc}") from exc
    return {"weights": "int8 reduced range", "activations": "uint8, ranges per batch at run time",
            "per_channel": config.per_channel, "kept_fp32": list(config.keep_fp32)}


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Static INT8 of a transformer: only the MatMul/Gemm inputs (and the embedding tables Gather reads)
# are quantized, and their outputs stay float (ONNX Runtime's MatMulIntegerToFloat). Quantizing everything to per-tensor uint8 breaks
# these models: the attention mask's fill value takes the Softmax input's whole range, and the
# residual stream's outlier features take the MatMul outputs' (``optimize explain`` shows both).
TRANSFORMER_OPS = ("MatMul", "Gemm", "Gather")
TRANSFORMER_STATIC = ("MatMul/Gemm inputs and embedding tables only; their outputs, LayerNorm, Softmax, GELU "
                      "and residual Adds stay float")
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention")  # what dynamic quantization replaces


def replaced_nodes(fp32_graph: Any, int8_graph: Any) -> list[Any]:
    """The FP32 graph's MatMul/Gemm nodes that a dynamic quantization replaced (their names are gone;
    their output tensors keep their names)."""
    kept = {n.name for n in int8_graph.node}
    return [n for n in fp32_graph.node if n.op_type in DYNAMIC_OPS and n.name and n.name not in kept]


def quantized_nodes(int8_graph: Any) -> list[Any]:
    """The nodes of a Q/DQ graph that read a dequantized tensor: every candidate for FP32."""
    dequantized = {n.output[0] for n in int8_graph.node if n.op_type == "DequantizeLinear"}
    return [n for n in int8_graph.node if n.op_type not in QDQ_OPS and n.name
            and any(i in dequantized for i in n.input)]


def fp32_candidates(fp32_path: Path, int8_path: Path) -> list[str]:
    """The nodes of an INT8 engine that keeping in FP32 changes: those reading a dequantized tensor
    (static, weight-only), else the MatMul/Gemm nodes a dynamic quantization replaced."""
    import onnx

    int8 = onnx.load(str(int8_path))
    nodes = [n.name for n in quantized_nodes(int8.graph)]
    return nodes or [n.name for n in replaced_nodes(onnx.load(str(fp32_path)).graph, int8.graph)]


def ranked_layers(context: RecoveryContext, folder: Path) -> list[tuple[str, float, tuple[str, ...]]]:
    """The engine's layers worst first with the candidate nodes that keep each in FP32: the shared
    per-layer ranking (``optimize.targets.layer_error``) on the selection split; candidates it has
    no number for go last, in graph order."""
    candidates = fp32_candidates(context.inputs.onnx, folder / ENGINE_FILE)
    layers = context.layer_error(folder) if context.layer_error else None
    if layers is None:
        return [(name, float("nan"), (name,)) for name in candidates]
    return layers.ranked_groups(candidates)


def _kept(judged: Any, groups: list[tuple[str, float, tuple[str, ...]]]) -> dict[str, Any]:
    """The manifest's record of what a candidate keeps in FP32 and how the layers were ranked."""
    kept = list(judged.candidate.config.keep_fp32)
    return {"kept_fp32": kept, "ranked_layers": len(groups),
            "ranked_by": "the error each layer adds fed the FP32 model's inputs (local SQNR, dB)",
            "ranking": [{"layer": node, "local_sqnr_db": None if db != db else round(db, 2), "nodes": list(names)}
                        for node, db, names in groups[:20]]}


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session with fixed thread settings."""

    def __init__(self, engine_dir: Path, config: RunnerConfig = RunnerConfig()):
        import onnxruntime as ort

        self._engine_dir = Path(engine_dir)
        extra = self._engine_dir / SESSION_OPTIONS_FILE
        self._session_config = json.loads(extra.read_text()) if extra.is_file() else {}
        self._config = config
        self._session = ort.InferenceSession(str(self._engine_dir / ENGINE_FILE), self._options(),
                                             providers=_providers())
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def _options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self._config.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        for key, value in self._session_config.items():
            options.add_session_config_entry(key, str(value))
        if not self._config.idle_spin:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, results))

    def coverage(self, sample: dict[str, np.ndarray]) -> Coverage:
        """The engine's precision: a session with this Runner's options that profiles one run of
        ``sample`` and writes the graph it optimized, both into a work folder of its own."""
        import onnx
        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix="ort-coverage-") as work:
            options = self._options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(work) / "profile")
            options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
            session = ort.InferenceSession(str(self._engine_dir / ENGINE_FILE), options, providers=_providers())
            session.run(None, sample)
            events = json.loads(Path(session.end_profiling()).read_text())
            optimized = onnx.load(str(Path(work) / "optimized.onnx"))
        engine = onnx.load(str(self._engine_dir / ENGINE_FILE))
        return Coverage(f"ONNX Runtime {ort.__version__}: its optimized graph and a profile of one run "
                        f"({', '.join(self._session.get_providers())})",
                        profiled_layers(events, optimized.graph), onnx_weight_bytes(engine.graph),
                        kernels_reported=False)

    def layer_probe(self) -> LayerProbe:
        from optimize.targets.ort_layers import OnnxLayerProbe

        return OnnxLayerProbe(self._engine_dir / ENGINE_FILE, self._options, _providers())

    @property
    def settings(self) -> dict[str, Any]:
        return {"backend": "onnxruntime", "providers": self._session.get_providers(),
                "intra_op_num_threads": self._config.threads or "default (physical cores)",
                "inter_op_num_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL",
                "session_config": self._session_config, "idle_spin": self._config.idle_spin}


def _providers() -> list[str]:
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    names = tuple(d if isinstance(d, str) else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type), names)
