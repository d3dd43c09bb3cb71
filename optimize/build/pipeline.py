"""Run a ``BuildPlan``: prepare -> prune (optional) -> export (checked) -> per target: build, validate,
gate, recover -> bundle.

Every heavy stage goes through the ``StageCache`` beside the bundle, so a rerun redoes only what
changed. The bundle is written atomically (see ``optimize.bundle.folder``). The CLI and the Python
API both call ``run_build`` with the same plan. Choosing a winner is a step after the build
(``optimize.auto``). Progress is logged to the ``optimize.*`` loggers; nothing is printed.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimize import validate
from optimize.build.plan import BuildPlan, SourceConfig
from optimize.build.export_stage import PARITY_SAMPLES, ExportResult, ExportStageConfig, run_export_stage
from optimize.build.prepare import Prepared, folder_data, load_labelled, prepare, run_reference
from optimize.build.target_stage import TargetConfig, TargetInputs, run_target
from optimize.bundle.cache import StageCache
from optimize.bundle.folder import BundleWriter, cache_dir_for, write_manifest
from optimize.bundle.manifest import Manifest, TargetRecord
from optimize.environment import library_versions, machine_info
from optimize.errors import OptimizeError
from optimize.inputs.checkpoint import file_sha256
from optimize.targets import registry
from optimize.targets.base import BuildInputs, RunnerConfig

if TYPE_CHECKING:

    from optimize.build.prune_stage import PruneResult

log = logging.getLogger(__name__)

@dataclasses.dataclass
class BuildResult:
    """What ``run_build`` returns: the bundle and its manifest. ``optimize.auto`` adds, when it
    chose a winner, the benchmark report, the decision and the report folder."""

    bundle: Path
    manifest: Manifest
    decision: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    report_folder: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [n for n, t in self.manifest.targets.items() if t.status == "failed"]


def source_hash(source: SourceConfig, checkpoint_sha256: str) -> str:
    """The model's identity: the checkpoint's content and the architecture it is loaded into."""
    text = json.dumps({"checkpoint": checkpoint_sha256, "arch": source.arch, "arch_kwargs": source.arch_kwargs},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_stages(plan: BuildPlan, prepared: Prepared, data: validate.GateData,
                  cache: StageCache) -> tuple[dict[str, Any], ExportResult, "PruneResult | None"]:
    """Prune (when asked) then export; the stages' manifest entries and their results."""
    module, reference, stages, pruned = prepared.loaded.module, prepared.reference, {}, None
    model_hash = source_hash(plan.source, prepared.loaded.sha256)
    if plan.prune is not None:
        from optimize.build.prune_stage import PRUNED_FILE, PruneStageConfig, recovery_data, run_prune_stage

        extra = (load_labelled(plan.data, prepared, plan.data.train_data, "--train-data")
                 if plan.data.train_data else None)
        config = PruneStageConfig(plan.prune, plan.distill, prepared.task, tuple(prepared.inputs),
                                  prepared.model_kind, plan.max_accuracy_drop)
        pruned = run_prune_stage(config, prepared.loaded, data, recovery_data(prepared, extra), model_hash, cache)
        module = pruned.module
        stages["prune"] = {**pruned.report, "checkpoint": PRUNED_FILE}
        model_hash = file_sha256(pruned.folder / PRUNED_FILE)
        # The export is checked against the model it exports; accuracy stays against the original.
        subset = prepared.held_out.take(np.arange(min(PARITY_SAMPLES, len(prepared.held_out))))
        reference = run_reference(module, subset, prepared.output_names)
    config = ExportStageConfig(tuple(prepared.inputs), tuple(prepared.output_names),
                               save_program=prepared.loaded.format != "torchscript")
    export = run_export_stage(config, module, prepared.held_out, reference, model_hash, cache)
    stages["export"] = {"program": "program.pt2" if export.program else None, "onnx": "model.onnx",
                        "onnx_sha256": export.onnx_sha256, "parity": export.parity, "tolerance": export.tolerance,
                        "checked_against": "pruned PyTorch model" if plan.prune else "PyTorch model",
                        "route": export.route, **({"failed_routes": export.failed_routes} if export.failed_routes else {})}
    if export.failed_routes:
        said = (f"exported by the {export.route} route, checked against PyTorch, after "
                f"{'; '.join(export.failed_routes)}")
        prepared.notes.append(said)
        log.info(f"note: {said}")
    return stages, export, pruned


def _failed(target: str, reason: str, **extra: Any) -> TargetRecord:
    return TargetRecord.from_json({"precision": registry.get(target).precision, "folder": f"targets/{target}",
                                   "status": "failed", "reason": reason, **extra})


def _targets(names: list[str], config: TargetConfig, inputs: TargetInputs, cache: StageCache,
             stop: "StopOnSignal") -> dict[str, TargetRecord]:
    """Each target in turn: its record, failed with the reason when it raised."""
    records = {}
    for target in names:
        stop.check()
        try:
            records[target] = run_target(target, config, inputs, cache)
        except OptimizeError as exc:
            records[target] = _failed(target, str(exc))
        except Exception as exc:  # one backend's bug must not hide the others: kept with its traceback
            import traceback

            log.exception(f"{target}: internal error")
            records[target] = _failed(target, f"internal error: {type(exc).__name__}: {exc}",
                                      traceback=traceback.format_exc())
        stop.check()  # a library may have swallowed the interrupt and let its stage finish
        record = records[target]
        log.info(f"{target}: {record.status}" + (f" ({record.reason})" if record.reason else ""))
    return records


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM during a build: a ``KeyboardInterrupt`` now, and remembered, so that a
    library that swallows it (a compiler's worker loop) still cannot let the build reach its commit:
    ``check()`` at every stage boundary raises again. Only the main thread can install handlers;
    elsewhere (a build in a worker thread) this does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
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
            log.warning(f"{self.received}: stopping the build; the bundle is not written and a previous one is kept")
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)


def run_build(plan: BuildPlan) -> BuildResult:
    """Execute the plan; return the bundle and its manifest.

    A target that fails is recorded as failed with its reason and the others still build; the
    bundle is written only when every stage before the targets succeeded.
    """
    targets = registry.expand(list(plan.targets))  # an unknown name fails before anything is loaded
    out = Path(plan.out)
    cache = StageCache((plan.cache_dir or cache_dir_for(out)) if plan.use_cache else None)
    with StopOnSignal() as stop, BundleWriter(out) as writer:
        for folder, pid in writer.removed_stale:
            log.info(f"removed {folder.name}, the staging folder of a build (pid {pid}) that was killed before it finished")
        data, said = folder_data(plan.source, plan.data)
        plan = dataclasses.replace(plan, data=data)
        for note in said:
            log.info(f"note: {note}")
        prepared = prepare(plan.source, plan.data, plan.task, plan.strict)
        prepared.notes[:0] = said
        stop.check()
        if plan.max_accuracy_drop is None:
            budget, said = validate.default_max_drop(prepared.task, prepared.reference[prepared.output_names[0]])
            plan = dataclasses.replace(plan, max_accuracy_drop=budget)
            if said:
                prepared.notes.append(said)
                log.info(f"note: {said}")
        log.info(f"task: {prepared.task}{' (inferred)' if prepared.task_inferred else ''}; "
                 f"{len(prepared.held_out)} held-out samples"
                 + (f", {len(prepared.selection)} for selection" if prepared.selection is not None else ""))
        text = None
        if plan.data.tokenizer:  # checked before any long stage; serving then takes strings
            from optimize.inputs.tokenizer import text_section

            length, source = prepared.max_length or (None, "")
            text = text_section(Path(plan.data.tokenizer), prepared.inputs, prepared.held_out.arrays, writer.root,
                                length, source)
        data = prepared.gate_data()
        stages, export, pruned = _model_stages(plan, prepared, data, cache)
        stop.check()
        inputs = TargetInputs(
            BuildInputs(export.onnx, export.program, cache.root / "timing.cache" if cache.root is not None else None),
            export.onnx_sha256, prepared.calibration, data)
        config = TargetConfig(plan.quant, plan.runner, plan.max_accuracy_drop, prepared.model_kind,
                              tuple(plan.batch_sizes), prepared.max_length[0] if prepared.max_length else None)
        records = _targets(targets, config, inputs, cache, stop)
        if cache.root is not None:
            log.info(cache_summary(cache))
        manifest = _write_bundle(writer.root, plan, prepared, export, pruned, stages, records, text)
        stop.check()
        bundle = writer.commit()
    return BuildResult(bundle, manifest)


def cache_summary(cache: StageCache) -> str:
    """What the stage cache did in this build: the stages reused and those built."""
    counts = collections.Counter(cache.hits)  # in order of first use; INT8 candidates share a label
    names = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())
    reused = f"{len(cache.hits)} reused" + (f" ({names})" if names else "")
    return f"stage cache {cache.root}: {reused}, {len(cache.misses)} built"


LABELS_FILE = "labels.txt"


def _labels(root: Path, prepared: Prepared) -> str | None:
    """The class names a model folder gives (``id2label``), one per line in ``labels.txt``, where they
    name every column of a classifier's first output."""
    names = (prepared.loaded.folder or {}).get("labels")
    first = prepared.reference[prepared.output_names[0]]
    if prepared.task != "classify" or not names or first.ndim != 2 or len(names) != first.shape[1]:
        return None
    (root / LABELS_FILE).write_text("".join(f"{name}\n" for name in names))
    return LABELS_FILE


def _drift_profile(root: Path, target: str, folder: Path, runner_config: RunnerConfig, prepared: Prepared,
                   text: dict[str, Any] | None) -> dict[str, Any]:
    """The target's drift reference, from the held-out data through the engine files just written."""
    from optimize.drift.profile import build_profile

    with registry.backend(target).runner(folder, runner_config) as runner:
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


def _write_bundle(root: Path, plan: BuildPlan, prepared: Prepared, export: ExportResult,
                  pruned: "PruneResult | None", stages: dict[str, Any], records: dict[str, TargetRecord],
                  text: dict[str, Any] | None = None) -> Manifest:
    shutil.copyfile(export.onnx, root / "model.onnx")
    if export.program is not None:
        shutil.copyfile(export.program, root / "program.pt2")
    if pruned is not None:
        shutil.copyfile(pruned.folder / stages["prune"]["checkpoint"], root / stages["prune"]["checkpoint"])
    _save_data(root, prepared)
    for name, record in records.items():
        if record.built and record.engine_dir is not None:
            destination = root / record.folder
            destination.mkdir(parents=True)
            for file in record.files or []:
                shutil.copyfile(record.engine_dir / file, destination / file)
            record.drift = _drift_profile(root, name, destination, plan.runner, prepared, text)
    loaded, held = prepared.loaded, prepared.held_out
    outputs = [{"name": n, "shape": [-1, *prepared.reference[n].shape[1:]], "dtype": "float32"}
               for n in prepared.output_names]
    labels = _labels(root, prepared)
    if labels:
        outputs[0]["labels"] = labels
    manifest = Manifest(
        model_name=plan.name or loaded.path.stem,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),  # the version's
        source={"checkpoint": str(loaded.path), "sha256": loaded.sha256, "kind": loaded.format,
                "arch": plan.source.arch, "arch_kwargs": plan.source.arch_kwargs,
                **({"folder": loaded.folder} if loaded.folder else {})},
        task=prepared.task, task_inferred=prepared.task_inferred, model_kind=prepared.model_kind,
        inputs=list(prepared.inputs),
        outputs=outputs, versions=library_versions(), machine=machine_info(), plan=plan.to_json(), runner_config=plan.runner,
        data={"held_out_samples": len(held), "held_out_source": held.source, "held_out_sha256": held.sha256,
              "calibration_samples": len(prepared.calibration) if prepared.calibration else 0,
              "calibration_sha256": prepared.calibration.sha256 if prepared.calibration else None,
              "selection_samples": len(prepared.selection) if prepared.selection else 0,
              "train_samples": len(prepared.train) if prepared.train else 0,
              "eval_samples": len(prepared.evaluation) if prepared.evaluation else 0,
              "image_preprocessing": plan.data.image.to_json(), "notes": prepared.notes,
              "chance_level": prepared.chance.to_json() if prepared.chance else None},
        warnings=list(prepared.warnings),
        stages=stages, text=text, targets=records, winner=None)
    write_manifest(root, manifest)
    return manifest
