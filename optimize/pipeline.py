"""Run a ``BuildPlan``: prepare -> prune (optional) -> export (checked) -> per target: build, validate,
gate, recover -> bundle -> (``--target auto`` or a latency SLO) benchmark and pick the winner.

Every heavy stage goes through the ``StageCache`` beside the bundle, so a rerun redoes only what
changed. The bundle is written atomically (see ``optimize.bundle``). The CLI and the Python API
both call ``run_build`` with the same plan.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import platform
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize import __version__, validate
from optimize.bundle import BundleWriter, cache_dir_for, write_manifest
from optimize.cache import Stage, StageCache
from optimize.checkpoint import file_sha256
from optimize.errors import OptimizeError
from optimize.manifest import Manifest, TargetRecord
from optimize.passes import export as export_pass
from optimize.plan import BuildPlan
from optimize.prepare import Prepared, prepare
from optimize.specs import TensorSpec
from optimize.target_stage import run_target
from optimize.targets import registry
from optimize.targets.base import BuildInputs

PARITY_SAMPLES = 32
VERSIONED_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf",
                      "tensorrt", "numpy", "torch-pruning")
EXPORT_STAGE = Stage("export", ("optimize.passes.export", "optimize.specs", "optimize.errors"),
                     packages=("torch", "onnx", "onnxscript", "onnxruntime"))


@dataclasses.dataclass(frozen=True)
class ExportStageConfig:
    """What keys the export: the inputs' names, shapes, dtypes and dynamic axes, the outputs'
    names, whether a ``torch.export`` program is saved beside the ONNX file, the parity sample count."""

    inputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    save_program: bool
    parity_samples: int = PARITY_SAMPLES

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "output_names": list(self.output_names),
                "save_program": self.save_program, "parity_samples": self.parity_samples}


@dataclasses.dataclass
class BuildResult:
    """What ``run_build`` returns: the bundle, its manifest and, when a winner was chosen, the
    benchmark decision and the report folder."""

    bundle: Path
    manifest: Manifest
    decision: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    report_folder: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [n for n, t in self.manifest.targets.items() if t.status == "failed"]


def library_versions() -> dict[str, str]:
    from optimize.cache import code_fingerprint

    versions = {"python": platform.python_version(), "optimize": __version__, "optimize_code": code_fingerprint()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine_info() -> dict[str, Any]:
    """The CPU (model, cores, architecture, the instruction sets that decide speed) and the system."""
    from optimize.cpu import detect

    return {**detect().to_json(), "system": platform.platform()}


# Warnings libraries print on every build that say nothing about the user's model.
HARMLESS_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),  # torch's pytree, from its own exporter
)


def _quiet_libraries() -> None:
    import warnings

    for name in ("torch.onnx", "torch._export", "nncf", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def source_hash(plan: BuildPlan, prepared: Prepared) -> str:
    """The model's identity: the checkpoint's content and the architecture it is loaded into."""
    text = json.dumps({"checkpoint": prepared.loaded.sha256, "arch": plan.source.arch,
                       "arch_kwargs": plan.source.arch_kwargs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _export_stage(prepared: Prepared, module: Any, model_hash: str, parity_reference: dict[str, np.ndarray],
                  cache: StageCache) -> tuple[Path, dict]:
    """torch.export -> ONNX, checked against ``module`` (the pruned model when pruning ran)."""
    loaded = prepared.loaded
    config = ExportStageConfig(tuple(prepared.inputs), tuple(prepared.output_names),
                               save_program=loaded.format != "torchscript")
    example = {k: v[:2] if len(v) >= 2 else np.concatenate([v, v]) for k, v in prepared.held_out.arrays.items()}

    def produce(folder: Path) -> dict:
        if not config.save_program:
            program = module
        else:
            # A loaded .pt2 is re-exported too, so its axes become the dynamic ones asked for.
            program = export_pass.export_program(module, example, prepared.inputs)
            export_pass.save_program(program, folder / "program.pt2")
        export_pass.export_onnx(program, example, prepared.inputs, prepared.output_names,
                                folder / "model.onnx")
        subset = prepared.held_out.take(np.arange(min(config.parity_samples, len(prepared.held_out))))
        got = export_pass.onnx_outputs(folder / "model.onnx", subset.batches(8))
        want = {k: v[:len(subset)] for k, v in parity_reference.items()}
        parity = export_pass.compare_outputs(want, got, export_pass.FP32_EXPORT_TOLERANCE, "ONNX export vs PyTorch")
        return {"program": "program.pt2" if config.save_program else None,
                "onnx_sha256": file_sha256(folder / "model.onnx"), "parity": parity,
                "tolerance": dataclasses.asdict(export_pass.FP32_EXPORT_TOLERANCE)}

    return cache.run(EXPORT_STAGE, {"model": model_hash, "held_out": prepared.held_out.sha256}, config, produce)


def _model_stages(plan: BuildPlan, prepared: Prepared, cache: StageCache,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], Path, dict, Path | None]:
    """Prune (when asked) then export; returns the stages' manifest entries and folders."""
    module, reference, stages, prune_dir = prepared.loaded.module, prepared.reference, {}, None
    model_hash = source_hash(plan, prepared)
    if plan.prune is not None:
        from optimize.prepare import run_reference
        from optimize.prune_stage import PRUNED_FILE, run_prune_stage

        module, prune_dir, report = run_prune_stage(plan, prepared, model_hash, cache, say)
        stages["prune"] = {**report, "checkpoint": PRUNED_FILE}
        model_hash = file_sha256(prune_dir / PRUNED_FILE)
        # The export is checked against the model it exports; accuracy stays against the original.
        subset = prepared.held_out.take(np.arange(min(PARITY_SAMPLES, len(prepared.held_out))))
        reference = run_reference(module, subset, prepared.output_names)
    export_dir, export_result = _export_stage(prepared, module, model_hash, reference, cache)
    stages["export"] = {"program": export_result.get("program"), "onnx": "model.onnx",
                        "onnx_sha256": export_result["onnx_sha256"], "parity": export_result["parity"],
                        "tolerance": export_result["tolerance"],
                        "checked_against": "pruned PyTorch model" if plan.prune else "PyTorch model"}
    return stages, export_dir, export_result, prune_dir


def _failed(target: str, reason: str) -> dict[str, Any]:
    return {"precision": registry.get(target).precision, "folder": f"targets/{target}", "status": "failed",
            "reason": reason}


def _targets(plan: BuildPlan, prepared: Prepared, inputs: BuildInputs, onnx_sha: str, cache: StageCache,
             say: Callable[[str], None], check: Callable[[], None] = lambda: None) -> dict[str, dict[str, Any]]:
    entries = {}
    for target in registry.expand(list(plan.targets)):
        check()
        try:
            entries[target] = run_target(plan, target, prepared, inputs, onnx_sha, cache, say)
        except OptimizeError as exc:
            entries[target] = _failed(target, str(exc))
        except Exception as exc:  # one backend's bug must not hide the others: kept with its traceback
            say(traceback.format_exc().rstrip())
            entries[target] = {**_failed(target, f"internal error: {type(exc).__name__}: {exc}"),
                               "traceback": traceback.format_exc()}
        check()  # a library may have swallowed the interrupt and let its stage finish
        entry = entries[target]
        say(f"{target}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""))
    return entries


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM during a build: a ``KeyboardInterrupt`` now, and remembered, so that a
    library that swallows it (a compiler's worker loop) still cannot let the build reach its commit:
    ``check()`` at every stage boundary raises again. Only the main thread can install handlers;
    elsewhere (a build in a worker thread) this does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        import signal

        if self.received is None:
            self.received = signal.Signals(number).name
            self.say(f"{self.received}: stopping the build; the bundle is not written and a previous one is kept")
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)


def run_build(plan: BuildPlan, say: Callable[[str], None] = print) -> BuildResult:
    """Execute the plan; return the bundle, its manifest and (when the plan selects one) the winner.

    A target that fails is recorded as failed with its reason and the others still build; the
    bundle is written only when every stage before the targets succeeded.
    """
    _quiet_libraries()
    registry.expand(list(plan.targets))  # an unknown name fails before anything is loaded
    out = Path(plan.out)
    cache = StageCache((plan.cache_dir or cache_dir_for(out)) if plan.use_cache else None)
    with StopOnSignal(say) as stop, BundleWriter(out) as writer:
        for folder, pid in writer.removed_stale:
            say(f"removed {folder.name}, the staging folder of a build (pid {pid}) that was killed before it finished")
        prepared = prepare(plan, say)
        stop.check()
        if plan.max_accuracy_drop is None:
            budget, said = validate.default_max_drop(prepared.task, prepared.reference[prepared.output_names[0]])
            plan = dataclasses.replace(plan, max_accuracy_drop=budget)
            if said:
                prepared.notes.append(said)
                say(f"note: {said}")
        say(f"task: {prepared.task}{' (inferred)' if prepared.task_inferred else ''}; "
            f"{len(prepared.held_out)} held-out samples"
            + (f", {len(prepared.selection)} for selection" if prepared.selection is not None else ""))
        text = None
        if plan.data.tokenizer:  # checked before any long stage; serving then takes strings
            from optimize.tokenizer import text_section

            length, source = prepared.max_length or (None, "")
            text = text_section(Path(plan.data.tokenizer), prepared.inputs, prepared.held_out.arrays, writer.root,
                                length, source)
        stages, export_dir, export_result, prune_dir = _model_stages(plan, prepared, cache, say)
        stop.check()
        program = export_dir / "program.pt2" if export_result.get("program") else None
        inputs = BuildInputs(export_dir / "model.onnx", program,
                             cache.root / "timing.cache" if cache.root is not None else None)
        entries = _targets(plan, prepared, inputs, export_result["onnx_sha256"], cache, say, stop.check)
        manifest = _write_bundle(writer.root, plan, prepared, export_dir, export_result, prune_dir,
                                 stages, entries, text)
        stop.check()
        bundle = writer.commit()
    result = BuildResult(bundle, manifest)
    selection = plan.winner_selection
    if selection is not None and manifest.built_targets():
        from optimize.bench.run import bench_bundle

        result.report, result.decision, result.report_folder = bench_bundle(
            bundle, selection.bench_config(), selection.slo, selection.load, say=say, progress=selection.progress,
            select=True)
        result.manifest = manifest if result.decision is None else _reread(bundle)
    return result


def _reread(bundle: Path) -> Manifest:
    from optimize.bundle import read_manifest

    return read_manifest(bundle)


def _drift_profile(root: Path, plan: BuildPlan, target: str, folder: Path, prepared: Prepared,
                   text: dict[str, Any] | None) -> dict[str, Any]:
    """The target's drift reference, from the held-out data through the engine files just written."""
    from optimize.drift.profile import build_profile

    with registry.backend(target).runner(folder, plan.runner) as runner:
        outputs = [{"name": n, "shape": [-1, *prepared.reference[n].shape[1:]]} for n in prepared.output_names]
        profile = build_profile(target, runner, prepared.held_out.arrays, [s.to_json() for s in prepared.inputs],
                                outputs, prepared.task, pad_id=text["pad_id"] if text else 0,
                                labels=prepared.held_out.labels)
    calibration = profile.calibration
    return {**profile.save(root), "features": profile.names, "scales": [s.to_json() for s in profile.plan_scales()],
            "requests_per_false_alarm": profile.requests_per_false_alarm,
            "estimated_accuracy": ({k: calibration[k] for k in ("method", "temperature", "threshold",
                                                                 "reference_accuracy", "check")}
                                   if profile.estimates_accuracy else {"method": None, "reason": calibration["reason"]})}


def _save_data(root: Path, prepared: Prepared) -> None:
    """The held-out inputs and labels, the reference outputs and the labelled evaluation data."""
    data = root / "data"
    data.mkdir()
    held = prepared.held_out
    np.savez(data / "heldout.npz", **held.arrays, **({"labels": held.labels} if held.labels is not None else {}))
    np.savez(data / "reference.npz", **prepared.reference)
    if prepared.evaluation is not None:
        ev = prepared.evaluation
        np.savez(data / "eval.npz", **ev.arrays, **({"labels": ev.labels} if ev.labels is not None else {}))
        np.savez(data / "eval_reference.npz", **prepared.eval_reference)


def _write_bundle(root: Path, plan: BuildPlan, prepared: Prepared, export_dir: Path, export_result: dict,
                  prune_dir: Path | None, stages: dict[str, Any], entries: dict[str, dict],
                  text: dict[str, Any] | None = None) -> Manifest:
    shutil.copyfile(export_dir / "model.onnx", root / "model.onnx")
    if export_result.get("program"):
        shutil.copyfile(export_dir / "program.pt2", root / "program.pt2")
    if prune_dir is not None:
        shutil.copyfile(prune_dir / stages["prune"]["checkpoint"], root / stages["prune"]["checkpoint"])
    _save_data(root, prepared)
    for name, entry in entries.items():
        cache_folder = entry.pop("cache_folder", None)
        if entry["status"] == "built" and cache_folder:
            destination = root / entry["folder"]
            destination.mkdir(parents=True)
            for file in entry["files"]:
                shutil.copyfile(Path(cache_folder) / file, destination / file)
            entry["drift"] = _drift_profile(root, plan, name, destination, prepared, text)
    loaded, held = prepared.loaded, prepared.held_out
    manifest = Manifest(
        model_name=plan.name or loaded.path.stem,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source={"checkpoint": str(loaded.path), "sha256": loaded.sha256, "kind": loaded.format,
                "arch": plan.source.arch, "arch_kwargs": plan.source.arch_kwargs},
        task=prepared.task, task_inferred=prepared.task_inferred, model_kind=prepared.model_kind,
        inputs=list(prepared.inputs),
        outputs=[{"name": n, "shape": [-1, *prepared.reference[n].shape[1:]], "dtype": "float32"}
                 for n in prepared.output_names],
        versions=library_versions(), machine=machine_info(), plan=plan.to_json(), runner_config=plan.runner,
        data={"held_out_samples": len(held), "held_out_source": held.source, "held_out_sha256": held.sha256,
              "calibration_samples": len(prepared.calibration) if prepared.calibration else 0,
              "calibration_sha256": prepared.calibration.sha256 if prepared.calibration else None,
              "selection_samples": len(prepared.selection) if prepared.selection else 0,
              "train_samples": len(prepared.train) if prepared.train else 0,
              "eval_samples": len(prepared.evaluation) if prepared.evaluation else 0,
              "image_preprocessing": plan.data.image.to_json(), "notes": prepared.notes,
              "chance_level": prepared.chance.to_json() if prepared.chance else None},
        warnings=list(prepared.warnings),
        stages=stages, text=text, targets={n: TargetRecord.from_json(e) for n, e in entries.items()}, winner=None)
    write_manifest(root, manifest)
    return manifest
