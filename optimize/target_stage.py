"""One target of a build: build its engine through the stage cache, gate it on accuracy against the
FP32 model, and let its backend recover accuracy when INT8 breaches the budget.

Every engine, the first and each recovery variant, is built by ``build_engine`` under the target's
``Stage``, so its cache key comes from the typed ``TargetStageConfig`` and the hashes of its inputs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.cache import Stage, StageCache
from optimize.calibration import Samples
from optimize.prepare import Prepared, evaluate_runner, judge_selection
from optimize.scheme_choice import offered_schemes
from optimize.scheme_choice import search as search_schemes
from optimize.targets import registry
from optimize.targets.base import Backend, BuildConfig, BuildInputs, Engine, RecoveryContext, RunnerConfig, engine_size


@dataclasses.dataclass(frozen=True)
class TargetStageConfig:
    """What keys one engine build: the target, its ``BuildConfig`` and what a recovery adds."""

    target: str
    build: BuildConfig
    extra: tuple[tuple[str, Any], ...] = ()  # e.g. an accuracy-control budget

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "build": self.build.to_json(), "extra": dict(self.extra)}


def target_stage(target: str) -> Stage:
    info = registry.get(target)
    return Stage(f"target-{target}", registry.facts(target).modules, packages=info.packages)


def default_scheme(kind: str) -> str:
    """Static Q/DQ for CNNs; for transformers on CPUs, weight-only INT8 keeps accuracy at FP32 speed."""
    return "weights" if kind == "transformer" else "static"


def build_config(plan: Any, target: str, kind: str, max_sequence_length: int | None = None) -> BuildConfig:
    """The target's ``BuildConfig`` from the plan; the batch and sequence range only for engines that fix it."""
    info = registry.get(target)
    scheme = (plan.quant.int8_scheme or default_scheme(kind)) if info.precision == "int8" else None
    fixed = registry.facts(target).fixed_batch_profile
    return BuildConfig(precision=info.precision, int8_scheme=scheme, calib_method=plan.quant.calib_method,
                       per_channel=plan.quant.per_channel, model_kind=kind,
                       calib_batch_size=plan.quant.calib_batch_size,
                       batch_sizes=tuple(plan.batch_sizes) if fixed else BuildConfig.batch_sizes,
                       max_sequence_length=max_sequence_length if fixed else None)


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


def evaluate_folder(backend: Backend, folder: Path, runner_config: RunnerConfig, prepared: Prepared,
                    max_drop: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(accuracy and gate, runner settings) of the engine in ``folder``."""
    with backend.runner(folder, runner_config) as runner:
        return evaluate_runner(runner, prepared, max_drop), runner.settings


def select_folder(backend: Backend, folder: Path, runner_config: RunnerConfig, prepared: Prepared,
                  max_drop: float | None) -> dict[str, Any]:
    """The engine in ``folder`` judged on the selection split."""
    with backend.runner(folder, runner_config) as runner:
        return judge_selection(lambda samples: runner.infer_all(samples.batches(32)), prepared, max_drop)


def run_target(plan: Any, target: str, prepared: Prepared, inputs: BuildInputs, onnx_sha: str,
               cache: StageCache, say: Callable[[str], None]) -> dict[str, Any]:
    """The target's manifest record (as JSON fields): built and within budget, failed with the
    reason, or unavailable on this machine."""
    info = registry.get(target)
    entry: dict[str, Any] = {"precision": info.precision, "folder": f"targets/{target}"}
    reason = registry.unavailable_reason(target)
    if reason:
        return {**entry, "status": "unavailable", "reason": reason}
    backend = registry.backend(target)
    config = build_config(plan, target, prepared.model_kind, prepared.max_length[0] if prepared.max_length else None)
    entry["build_config"] = config.to_json()
    calibration = prepared.calibration
    if config.precision == "int8" and config.int8_scheme == "static" and calibration is None:
        return {**entry, "status": "failed", "reason": "static INT8 needs calibration data: pass --calib"}
    backend.check_config(config)
    hashes = {"onnx": onnx_sha, "calibration": calibration.sha256 if calibration is not None else None}

    def context(trial: BuildConfig, built: Path | None) -> RecoveryContext:
        selection, selection_reference, selection_name = prepared.selection_split()
        return RecoveryContext(
            inputs=inputs, config=trial, calibration=calibration, built=built, held_out=prepared.held_out,
            reference=prepared.reference, task=prepared.task, max_drop=plan.max_accuracy_drop,
            build=lambda variant, label, builder=None, extra=None: build_engine(
                backend, target, inputs, hashes, variant, calibration, cache, label, builder, extra),
            evaluate=lambda path: evaluate_folder(backend, path, plan.runner, prepared, plan.max_accuracy_drop),
            say=say, selection=selection, selection_reference=selection_reference, selection_name=selection_name,
            select=lambda path: select_folder(backend, path, plan.runner, prepared, plan.max_accuracy_drop))

    schemes = offered_schemes(backend, calibration is not None)
    chosen = None
    if config.precision == "int8" and plan.quant.int8_scheme is None and len(schemes) > 1:
        say(f"building {target} (int8: {', '.join(schemes)}, the scheme chosen by measurement)")
        samples, _ = context(config, None).choice_data()
        feeds = samples.take(np.arange(1)).arrays
        choice = search_schemes(backend, context(config, None), schemes, plan.runner, feeds, cache,
                                plan.quant.recover_accuracy, backend.recoverable)
        entry["scheme_choice"] = choice.record
        chosen, config = choice.fields, choice.config
    if chosen is None:
        say(f"building {target} ({config.precision}{', ' + config.int8_scheme if config.int8_scheme else ''})")
        folder, result = build_engine(backend, target, inputs, hashes, config, calibration, cache)
        evaluation, settings = evaluate_folder(backend, folder, plan.runner, prepared, plan.max_accuracy_drop)
        chosen = {**result, **evaluation, "runner_settings": settings, "cache_folder": str(folder)}
    chosen = dict(chosen)
    entry["precision"] = chosen.pop("precision", None) or info.precision  # torch-compile: fp16 on a GPU
    entry.update({"build_config": config.to_json(), **chosen})
    if (not entry["gate"]["passed"] and config.precision == "int8" and plan.quant.recover_accuracy
            and "recovery" not in entry):
        say(f"{target}: {entry['gate']['message']}; searching INT8 variants")
        recovered = backend.recover(context(config, Path(entry["cache_folder"])))
        if recovered is not None:
            recovered.pop("precision", None)
            entry.update(recovered)
    if entry["gate"].get("straddles_budget"):
        say(f"{target}: warning: {entry['gate']['message']}")
    if entry["gate"]["passed"]:
        entry["status"] = "built"
    else:
        entry.update(status="failed", reason=f"accuracy gate: {entry['gate']['message']}")
    entry["size_bytes"] = engine_size(Path(entry["cache_folder"]), entry["files"])
    return entry
