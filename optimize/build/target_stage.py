"""One target of a build: build its engine through the stage cache, gate it on accuracy against the
FP32 model, and let its backend recover accuracy when INT8 breaches the budget.

Every engine, the first and each recovery variant, is built by ``build_engine`` under the target's
``Stage``, so its cache key comes from the typed ``TargetStageConfig`` and the hashes of its inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.build.plan import QuantConfig
from optimize.build.scheme_choice import offered_schemes
from optimize.build.scheme_choice import search as search_schemes
from optimize.bundle.cache import Stage, StageCache
from optimize.bundle.manifest import TargetRecord
from optimize.inputs.calibration import Samples
from optimize.targets import registry
from optimize.targets.base import Backend, BuildConfig, BuildInputs, Engine, RecoveryContext, RunnerConfig, engine_size
from optimize.targets.coverage import label, problem
from optimize.targets.layer_error import engine_layers, precision_by_node
from optimize.validate import GateData, evaluate, judge_selection, runs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TargetStageConfig:
    """What keys one engine build: the target, its ``BuildConfig`` and what a recovery adds."""

    target: str
    build: BuildConfig
    extra: tuple[tuple[str, Any], ...] = ()  # e.g. an accuracy-control budget

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "build": self.build.to_json(), "extra": dict(self.extra)}


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """What one target's stage takes from the plan: INT8 choices, the runner, the accuracy budget,
    the model's kind, and the batch and sequence range for engines that fix theirs."""

    quant: QuantConfig
    runner: RunnerConfig
    max_accuracy_drop: float
    model_kind: str
    batch_sizes: tuple[int, ...]
    max_sequence_length: int | None = None


@dataclasses.dataclass(frozen=True)
class TargetInputs:
    """The artifacts one target's stage builds from: the checked ONNX export (and its hash, which keys
    the cache), the calibration samples and the data the gate measures on."""

    build: BuildInputs
    onnx_sha256: str
    calibration: Samples | None
    data: GateData


def target_stage(target: str) -> Stage:
    info = registry.get(target)
    return Stage(f"target-{target}", registry.facts(target).modules, packages=info.packages)


def default_scheme(kind: str) -> str:
    """Static Q/DQ for CNNs; for transformers on CPUs, weight-only INT8 keeps accuracy at FP32 speed."""
    return "weights" if kind == "transformer" else "static"


def build_config(config: TargetConfig, target: str) -> BuildConfig:
    """The target's ``BuildConfig``; the batch and sequence range only for engines that fix it."""
    info = registry.get(target)
    quant = config.quant
    scheme = (quant.int8_scheme or default_scheme(config.model_kind)) if info.precision == "int8" else None
    fixed = registry.facts(target).fixed_batch_profile
    return BuildConfig(precision=info.precision, int8_scheme=scheme, calib_method=quant.calib_method,
                       per_channel=quant.per_channel, model_kind=config.model_kind,
                       calib_batch_size=quant.calib_batch_size,
                       batch_sizes=tuple(config.batch_sizes) if fixed else BuildConfig.batch_sizes,
                       max_sequence_length=config.max_sequence_length if fixed else None)


def build_engine(backend: Backend, target: str, inputs: BuildInputs, input_hashes: dict[str, str | None],
                 config: BuildConfig, calibration: Samples | None, cache: StageCache, label: str | None = None,
                 builder: Callable[..., Engine] | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Build one engine through the cache: (folder, {files, details, precision, build_time_s})."""
    stage_config = TargetStageConfig(target, config, tuple(sorted((extra or {}).items())))

    def produce(folder: Path) -> dict[str, Any]:
        start = time.perf_counter()
        engine = (builder or backend.build)(inputs, config, calibration, folder)
        return {"files": engine.files, "details": engine.details, "precision": engine.precision,
                "build_time_s": round(time.perf_counter() - start, 3)}

    name = f"target-{target}" + (f"-{label}" if label else "")
    return cache.run(target_stage(target), input_hashes, stage_config, produce, label=name)


def evaluate_folder(backend: Backend, folder: Path, runner_config: RunnerConfig, data: GateData,
                    max_drop: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(accuracy and gate, runner settings) of the engine in ``folder``."""
    with backend.runner(folder, runner_config) as runner:
        return evaluate(runs(runner), data, max_drop), runner.settings


def select_folder(backend: Backend, folder: Path, runner_config: RunnerConfig, data: GateData,
                  max_drop: float | None) -> dict[str, Any]:
    """The engine in ``folder`` judged on the selection split."""
    with backend.runner(folder, runner_config) as runner:
        return judge_selection(runs(runner), data, max_drop)


def read_coverage(backend: Backend, folder: Path, runner_config: RunnerConfig,
                  sample: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """The engine's precision read back from the engine in ``folder`` (``optimize.targets.coverage``);
    where it cannot be read, the reason."""
    try:
        with backend.runner(folder, runner_config) as runner:
            found = runner.coverage(sample)
    except Exception as exc:  # a reader that meets an engine it does not know: said, not fatal
        log.warning(f"the engine's precision could not be read back: {type(exc).__name__}: {exc}")
        return {"read_from": None, "error": f"{type(exc).__name__}: {exc}"}
    return found.to_json() if found is not None else None


def run_target(target: str, config: TargetConfig, inputs: TargetInputs, cache: StageCache) -> TargetRecord:
    """The target's manifest record: built and within budget, failed with the reason, or unavailable
    on this machine. A built record carries the cache folder of its engine (``engine_dir``)."""
    info = registry.get(target)
    entry: dict[str, Any] = {"precision": info.precision, "folder": f"targets/{target}"}
    reason = registry.unavailable_reason(target)
    if reason:
        return TargetRecord.from_json({**entry, "status": "unavailable", "reason": reason})
    backend = registry.backend(target)
    build = build_config(config, target)
    entry["build_config"] = build.to_json()
    calibration, data, budget = inputs.calibration, inputs.data, config.max_accuracy_drop
    if build.precision == "int8" and build.int8_scheme == "static" and calibration is None:
        return TargetRecord.from_json({**entry, "status": "failed",
                                       "reason": "static INT8 needs calibration data: pass --calib"})
    backend.check_config(build)
    hashes = {"onnx": inputs.onnx_sha256, "calibration": calibration.sha256 if calibration is not None else None}

    def context(trial: BuildConfig, built: Path | None) -> RecoveryContext:
        return RecoveryContext(
            inputs=inputs.build, config=trial, calibration=calibration, built=built, data=data, max_drop=budget,
            build=lambda variant, label, builder=None, extra=None: build_engine(
                backend, target, inputs.build, hashes, variant, calibration, cache, label, builder, extra),
            evaluate=lambda path: evaluate_folder(backend, path, config.runner, data, budget),
            select=lambda path: select_folder(backend, path, config.runner, data, budget),
            coverage=lambda path: read_coverage(backend, path, config.runner, sample),
            layer_error=lambda path, nodes=None: engine_layers(
                backend, path, config.runner, inputs.build.onnx, data.selection.samples, nodes))

    schemes = offered_schemes(backend, calibration is not None)
    sample = data.selection.samples.take(np.arange(1)).arrays  # one sample: what timings and coverage run
    chosen = None
    if build.precision == "int8" and config.quant.int8_scheme is None and len(schemes) > 1:
        log.info(f"building {target} (int8: {', '.join(schemes)}, the scheme chosen by measurement)")
        choice = search_schemes(backend, context(build, None), schemes, config.runner, sample, cache,
                                config.quant.recover_accuracy, backend.recoverable)
        entry["scheme_choice"] = choice.record
        chosen, build = choice.fields, choice.config
    if chosen is None:
        log.info(f"building {target} ({label(backend.precision(build), build.int8_scheme)})")
        folder, result = build_engine(backend, target, inputs.build, hashes, build, calibration, cache)
        evaluation, settings = evaluate_folder(backend, folder, config.runner, data, budget)
        chosen = {**result, **evaluation, "runner_settings": settings, "cache_folder": str(folder)}
    chosen = dict(chosen)
    entry["precision"] = chosen.pop("precision", None) or info.precision  # torch-compile: fp16 on a GPU
    entry.update({"build_config": build.to_json(), **chosen})
    if (not entry["gate"]["passed"] and build.precision == "int8" and config.quant.recover_accuracy
            and "recovery" not in entry):
        log.info(f"{target}: {entry['gate']['message']}; searching INT8 variants")
        recovered = backend.recover(context(build, Path(entry["cache_folder"])))
        if recovered is not None:
            recovered.pop("precision", None)
            entry.update(recovered)
    if entry["gate"].get("straddles_budget"):
        log.warning(f"{target}: {entry['gate']['message']}")
    engine_dir = Path(entry.pop("cache_folder"))
    entry["coverage"] = read_coverage(backend, engine_dir, config.runner, sample)
    if entry.get("recovery"):  # the per-layer picture of the engine the fallback chose
        picture = engine_layers(backend, engine_dir, config.runner, inputs.build.onnx, data.selection.samples)
        if picture is not None:
            entry["recovery"]["layer_error"] = picture.to_json(precision_by_node(picture.rows, entry["coverage"]))
    mismatch = problem(entry["precision"], build.int8_scheme, entry["coverage"])
    if mismatch:
        entry.update(status="failed", reason=f"precision read back from the engine: {mismatch}")
    elif entry["gate"]["passed"]:
        entry["status"] = "built"
    else:
        entry.update(status="failed", reason=f"accuracy gate: {entry['gate']['message']}")
    if entry["status"] == "failed":
        entry["cache_entry"] = str(engine_dir.resolve())
    entry["size_bytes"] = engine_size(engine_dir, entry["files"])
    record = TargetRecord.from_json(entry)
    record.engine_dir = engine_dir
    return record
