"""Run a ``BuildPlan``: prepare -> prune (optional) -> export (checked) -> per target: build, validate,
gate -> bundle.

Every heavy stage goes through the ``StageCache`` beside the bundle, so a rerun redoes only what
changed. The bundle is written atomically (see ``optimize.bundle``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import os
import platform
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize import __version__
from optimize.bundle import SCHEMA_VERSION, BundleWriter, cache_dir_for, write_json
from optimize.cache import StageCache
from optimize.checkpoint import file_sha256
from optimize.errors import OptimizeError
from optimize.passes import export as export_pass
from optimize.plan import BuildPlan
from optimize.prepare import Prepared, evaluate_runner, prepare
from optimize.targets import registry
from optimize.targets.base import BuildConfig, engine_size
from optimize import validate

PARITY_SAMPLES = 32
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
                      "tensorrt", "numpy", "torch-pruning")


@dataclasses.dataclass
class BuildResult:
    bundle: Path
    manifest: dict[str, Any]

    @property
    def failed(self) -> list[str]:
        return [n for n, e in self.manifest["targets"].items() if e["status"] == "failed"]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "optimize": __version__}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def model_kind(onnx_path: Path, prepared: Prepared) -> str:
    """``transformer`` for token inputs or MatMul-dominated graphs, else ``cnn``."""
    import onnx

    if any(np.dtype(s.dtype).kind in "iu" for s in prepared.inputs):
        return "transformer"
    ops = [n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    return "transformer" if ops.count("MatMul") > max(ops.count("Conv"), 2) else "cnn"


def default_scheme(target: str, kind: str) -> str:
    """Static Q/DQ for CNNs; for transformers on CPUs, schemes that keep accuracy at FP32 speed."""
    if kind != "transformer":
        return "static"
    return "weights"


def _quiet_libraries() -> None:
    for name in ("torch.onnx", "torch._export", "nncf", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _export_stage(prepared: Prepared, module: Any, source_key: dict[str, Any],
                  parity_reference: dict[str, np.ndarray], cache: StageCache) -> tuple[Path, dict]:
    """torch.export -> ONNX, checked against ``module`` (the pruned model when pruning ran)."""
    import torch

    loaded = prepared.loaded
    key = {"stage": "export", **source_key, "inputs": [s.to_json() for s in prepared.inputs],
           "torch": torch.__version__, "version": 1}
    example = {k: v[:2] if len(v) >= 2 else np.concatenate([v, v]) for k, v in prepared.held_out.arrays.items()}

    def produce(folder: Path) -> dict:
        if loaded.kind == "torchscript":
            program = module
        else:
            # A loaded .pt2 is re-exported too, so its axes become the dynamic ones asked for.
            program = export_pass.export_program(module, example, prepared.inputs)
            export_pass.save_program(program, folder / "program.pt2")
        export_pass.export_onnx(program, example, prepared.inputs, prepared.output_names,
                                folder / "model.onnx")
        parity = _parity(folder / "model.onnx", prepared, parity_reference)
        return {"program": None if loaded.kind == "torchscript" else "program.pt2",
                "onnx_sha256": file_sha256(folder / "model.onnx"), "parity": parity,
                "tolerance": dataclasses.asdict(export_pass.FP32_EXPORT_TOLERANCE)}

    return cache.run("export", key, produce)


def _parity(onnx_path: Path, prepared: Prepared, reference: dict[str, np.ndarray]) -> dict:
    from optimize.targets.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(onnx_path.parent)
    subset = prepared.held_out.take(np.arange(min(PARITY_SAMPLES, len(prepared.held_out))))
    got = runner.infer_all(subset.batches(8))
    want = {k: v[:len(subset)] for k, v in reference.items()}
    return export_pass.compare_outputs(want, got, export_pass.FP32_EXPORT_TOLERANCE,
                                       "ONNX export vs PyTorch")


def _model_stages(plan: BuildPlan, prepared: Prepared, cache: StageCache,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], Path, dict, Path | None]:
    """Prune (when asked) then export; returns the stages' manifest entries and folders."""
    loaded = prepared.loaded
    source_key = {"checkpoint": loaded.sha256, "arch": plan.source.arch, "arch_kwargs": plan.source.arch_kwargs}
    module, reference, stages, prune_dir = loaded.module, prepared.reference, {}, None
    if plan.prune is not None:
        from optimize.prepare import run_reference
        from optimize.prune_stage import PRUNED_FILE, run_prune_stage

        module, prune_dir, report = run_prune_stage(plan, prepared, cache, say)
        stages["prune"] = {**report, "checkpoint": PRUNED_FILE}
        source_key["pruned"] = file_sha256(prune_dir / PRUNED_FILE)
        # The export is checked against the model it exports; accuracy stays against the original.
        subset = prepared.held_out.take(np.arange(min(PARITY_SAMPLES, len(prepared.held_out))))
        reference = run_reference(module, subset, prepared.output_names)
    export_dir, export_result = _export_stage(prepared, module, source_key, reference, cache)
    stages["export"] = {"program": export_result.get("program"), "onnx": "model.onnx",
                        "onnx_sha256": export_result["onnx_sha256"], "parity": export_result["parity"],
                        "tolerance": export_result["tolerance"],
                        "checked_against": "pruned PyTorch model" if plan.prune else "PyTorch model"}
    return stages, export_dir, export_result, prune_dir


def _build_config(plan: BuildPlan, target: str, kind: str) -> BuildConfig:
    info = registry.get(target)
    scheme = None
    if info.precision == "int8":
        scheme = plan.quant.int8_scheme or default_scheme(target, kind)
    return BuildConfig(precision=info.precision, int8_scheme=scheme,
                       calib_method=plan.quant.calib_method, per_channel=plan.quant.per_channel,
                       model_kind=kind, calib_batch_size=plan.quant.calib_batch_size,
                       batch_sizes=tuple(plan.batch_sizes) if registry.get(target).needs_gpu else BuildConfig.batch_sizes)


def _target_stage(plan: BuildPlan, target: str, prepared: Prepared, onnx_path: Path,
                  onnx_sha: str, kind: str, cache: StageCache, say: Callable[[str], None]) -> dict:
    reason = registry.unavailable_reason(target)
    info = registry.get(target)
    entry: dict[str, Any] = {"precision": info.precision, "folder": f"targets/{target}"}
    if reason:
        return {**entry, "status": "unavailable", "reason": reason}
    config = _build_config(plan, target, kind)
    entry["build_config"] = config.to_json()
    module = registry.backend(target)
    if config.precision == "int8" and config.int8_scheme == "static" and prepared.calibration is None:
        return {**entry, "status": "failed", "reason": "static INT8 needs calibration data: pass --calib"}
    versions = library_versions()
    calib = prepared.calibration
    key = {"stage": "target", "target": target, "onnx": onnx_sha, "config": config.to_json(),
           "calibration": calib.sha256 if calib is not None else None,
           "versions": {k: versions.get(k) for k in info.packages}, "version": 1}

    def produce(folder: Path) -> dict:
        start = time.perf_counter()
        engine = module.build(onnx_path, config, calib, folder)
        return {"files": engine.files, "details": engine.details,
                "build_time_s": round(time.perf_counter() - start, 3)}

    say(f"building {target} ({config.precision}{', ' + config.int8_scheme if config.int8_scheme else ''})")
    folder, result = cache.run(f"target-{target}", key, produce)
    runner = module.load_runner(folder, plan.runner)
    evaluation = evaluate_runner(runner, prepared, plan.max_accuracy_drop)
    entry["precision"] = result["details"].get("precision", entry["precision"])  # torch-compile: fp16 on a GPU
    entry.update(result, runner_settings=runner.settings, cache_folder=str(folder),
                 size_bytes=engine_size(folder, result["files"]), **evaluation)
    if not evaluation["gate"]["passed"] and config.precision == "int8" and plan.quant.recover_accuracy:
        from optimize.recovery import recover

        say(f"{target}: {evaluation['gate']['message']}; keeping sensitive layers in FP32")
        recovered = recover(plan, target, module, config, prepared, onnx_path, key, cache, folder, say)
        if recovered is not None:
            entry.update(recovered)
    runner.close()
    if entry["gate"]["passed"]:
        entry["status"] = "built"
    else:
        entry.update(status="failed", reason=f"accuracy gate: {entry['gate']['message']}")
    return entry


def run_build(plan: BuildPlan, say: Callable[[str], None] = print) -> BuildResult:
    """Execute the plan; return the bundle path and its manifest."""
    _quiet_libraries()
    out = Path(plan.out)
    targets = registry.expand(list(plan.targets))
    writer = BundleWriter(out)
    with writer:
        cache = StageCache(cache_dir_for(out) if plan.use_cache else None)
        prepared = prepare(plan, say)
        if plan.max_accuracy_drop is None:
            plan = dataclasses.replace(plan, max_accuracy_drop=validate.DEFAULT_MAX_DROP[prepared.task])
        say(f"task: {prepared.task}{' (inferred)' if prepared.task_inferred else ''}; "
            f"{len(prepared.held_out)} held-out samples")
        text = None
        if plan.data.tokenizer:  # checked before any long stage; serving then takes strings
            from optimize.text import text_section

            text = text_section(Path(plan.data.tokenizer), prepared.inputs, prepared.held_out.arrays, writer.root)
        stages, export_dir, export_result, prune_dir = _model_stages(plan, prepared, cache, say)
        onnx_path = export_dir / "model.onnx"
        kind = model_kind(onnx_path, prepared)
        entries = {}
        for target in targets:
            try:
                entries[target] = _target_stage(plan, target, prepared, onnx_path,
                                                export_result["onnx_sha256"], kind, cache, say)
            except OptimizeError as exc:
                entries[target] = {"precision": registry.get(target).precision,
                                   "folder": f"targets/{target}", "status": "failed", "reason": str(exc)}
            except Exception as exc:  # a backend's internal failure must not hide the others
                traceback.print_exc()
                entries[target] = {"precision": registry.get(target).precision,
                                   "folder": f"targets/{target}", "status": "failed",
                                   "reason": f"internal error: {type(exc).__name__}: {exc}"}
            say(f"{target}: {entries[target]['status']}"
                + (f" ({entries[target]['reason']})" if entries[target].get("reason") else ""))
        manifest = _write_bundle(writer.root, plan, prepared, export_dir, export_result, prune_dir,
                                 stages, kind, entries, text)
        bundle = writer.commit()
    return BuildResult(bundle, manifest)


def _drift_profile(root: Path, plan: BuildPlan, target: str, folder: Path, prepared: Prepared,
                   text: dict[str, Any] | None) -> dict[str, Any]:
    """The target's drift reference, from the held-out data through the engine files just written."""
    from optimize.drift.profile import build_profile

    runner = registry.backend(target).load_runner(folder, plan.runner)
    try:
        outputs = [{"name": n, "shape": [-1, *prepared.reference[n].shape[1:]]} for n in prepared.output_names]
        profile = build_profile(target, runner, prepared.held_out.arrays, [s.to_json() for s in prepared.inputs],
                                outputs, prepared.task, pad_id=text["pad_id"] if text else 0)
    finally:
        runner.close()
    return {**profile.save(root), "features": profile.names, "window": profile.window, "alpha": profile.alpha}


def _write_bundle(root: Path, plan: BuildPlan, prepared: Prepared, export_dir: Path, export_result: dict,
                  prune_dir: Path | None, stages: dict[str, Any], kind: str, entries: dict[str, dict],
                  text: dict[str, Any] | None = None) -> dict:
    shutil.copyfile(export_dir / "model.onnx", root / "model.onnx")
    if export_result.get("program"):
        shutil.copyfile(export_dir / "program.pt2", root / "program.pt2")
    if prune_dir is not None:
        shutil.copyfile(prune_dir / stages["prune"]["checkpoint"], root / stages["prune"]["checkpoint"])
    data = root / "data"
    data.mkdir()
    held = prepared.held_out
    np.savez(data / "heldout.npz", **held.arrays, **({"labels": held.labels} if held.labels is not None else {}))
    np.savez(data / "reference.npz", **prepared.reference)
    if prepared.evaluation is not None:
        ev = prepared.evaluation
        np.savez(data / "eval.npz", **ev.arrays, **({"labels": ev.labels} if ev.labels is not None else {}))
        np.savez(data / "eval_reference.npz", **prepared.eval_reference)
    for name, entry in entries.items():
        cache_folder = entry.pop("cache_folder", None)
        if entry["status"] == "built" and cache_folder:
            destination = root / entry["folder"]
            destination.mkdir(parents=True)
            for file in entry["files"]:
                shutil.copyfile(Path(cache_folder) / file, destination / file)
            entry["drift"] = _drift_profile(root, plan, name, destination, prepared, text)
    loaded = prepared.loaded
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_name": plan.name or loaded.path.stem,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(loaded.path), "sha256": loaded.sha256, "kind": loaded.kind,
                   "arch": plan.source.arch, "arch_kwargs": plan.source.arch_kwargs},
        "task": prepared.task, "task_inferred": prepared.task_inferred, "model_kind": kind,
        "inputs": [s.to_json() for s in prepared.inputs],
        "outputs": [{"name": n, "shape": [-1, *prepared.reference[n].shape[1:]],
                     "dtype": "float32"} for n in prepared.output_names],
        "versions": library_versions(), "machine": machine_info(),
        "plan": plan.to_json(), "runner_config": plan.runner.to_json(),
        "data": {"held_out_samples": len(held), "held_out_source": held.source,
                 "held_out_sha256": held.sha256,
                 "calibration_samples": len(prepared.calibration) if prepared.calibration else 0,
                 "calibration_sha256": prepared.calibration.sha256 if prepared.calibration else None,
                 "eval_samples": len(prepared.evaluation) if prepared.evaluation else 0,
                 "image_preprocessing": plan.data.image.to_json(), "notes": prepared.notes},
        "stages": stages,
        "text": text,
        "targets": entries,
        "winner": None,
    }
    write_json(root / "manifest.json", manifest)
    return manifest
