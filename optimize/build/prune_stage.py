"""The prune stage of a build: prune a copy of the model, recover it by distillation, measure each step.

Runs between ``prepare`` and export. Its cached folder holds ``pruned.pt`` (weights plus the
changed layer widths) and the report; the pruned module is always rebuilt from that file, so a
cached rerun and a fresh run export the same model. Accuracy is measured against the original,
unpruned model at every step: the original itself, pruned, and recovered.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from optimize.bundle.cache import Stage, StageCache
from optimize.inputs.calibration import Samples
from optimize.errors import PruneError
from optimize.passes import distill as distill_pass
from optimize.passes import recovery_curve
from optimize.passes import prune as prune_pass
from optimize.inputs import pruned_checkpoint
from optimize.build.prepare import Prepared, run_reference
from optimize.inputs.checkpoint import LoadedModel
from optimize.inputs.specs import TensorSpec
from optimize.validate import GateData, evaluate, judge

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRUNED_FILE = "pruned.pt"
TAYLOR_BATCHES = 4
PRUNE_STAGE = Stage("prune", ("optimize.build.prune_stage", "optimize.quiet", "optimize.passes.prune", "optimize.passes.distill", "optimize.passes.recovery_curve",
                              "optimize.passes.onnx_export", "optimize.inputs.pruned_checkpoint", "optimize.build.prepare", "optimize.inputs.calibration",
                              "optimize.build.fit", "optimize.inputs.tokenizer",
                              "optimize.inputs.checkpoint", "optimize.inputs.factory", "optimize.inputs.hf_folder",
                               "optimize.inputs.binding", "optimize.inputs.specs", "optimize.validate",
                              "optimize.errors"),
                    packages=("torch", "torch-pruning", "transformers"))


@dataclasses.dataclass(frozen=True)
class PruneStageConfig:
    """What keys the prune stage: pruning and recovery settings, the task and the inputs."""

    prune: prune_pass.PruneConfig
    distill: distill_pass.DistillConfig
    task: str
    inputs: tuple[TensorSpec, ...]
    model_kind: str
    max_accuracy_drop: float | None  # decides the report's warning after recovery

    def to_json(self) -> dict[str, Any]:
        return {"prune": self.prune.to_json(), "distill": self.distill.to_json(), "task": self.task,
                "inputs": [s.to_json() for s in self.inputs], "model_kind": self.model_kind,
                "max_accuracy_drop": self.max_accuracy_drop}


def _tensors(samples: Samples, names: list[str], index: np.ndarray | slice) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(samples.arrays[n][index])) for n in names)


def recovery_data(prepared: Prepared, train_data: Samples | None = None) -> Samples | None:
    """All the ``--calib`` data not held out for the gate or kept for selection (unlabelled is fine;
    the calibration cap does not apply), plus ``--train-data`` (labelled) when given."""
    own = prepared.train if prepared.train is not None else prepared.calibration
    parts = [p for p in (own, train_data) if p is not None]
    if not parts:
        return None
    names = [s.name for s in prepared.inputs]
    arrays = {n: np.concatenate([p.arrays[n] for p in parts]) for n in names}
    labels = None
    if any(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels if p.labels is not None else np.full(len(p), -1) for p in parts])
    return Samples(arrays, labels, " + ".join(p.source for p in parts))


def evaluate_module(module: "torch.nn.Module", data: GateData, max_drop: float | None) -> dict[str, Any]:
    """``validate.evaluate`` for a PyTorch module (the pruned model before and after recovery)."""
    names = list(data.held_out.reference)
    return evaluate(lambda samples: run_reference(module, samples, names), data, max_drop)


def _taylor_batches(samples: Samples | None, config: PruneStageConfig, data: GateData,
                    loss: Callable) -> tuple[list, Callable]:
    """Batches for Taylor importance and a loss that sees their labels (or pseudo-labels)."""
    import torch

    names = [s.name for s in config.inputs]
    source = samples if samples is not None else data.held_out.samples
    batches, labels = [], []
    for start in range(0, min(len(source), 32 * TAYLOR_BATCHES), 32):
        batches.append(_tensors(source, names, slice(start, start + 32)))
        chunk = None if source.labels is None else source.labels[start:start + 32]
        labels.append(None if chunk is None or (chunk < 0).any() else torch.from_numpy(chunk.astype(np.int64)))
    remaining = iter(labels)
    return batches, lambda outputs: loss(outputs, next(remaining))


def _recover(original: "torch.nn.Module", pruned: "torch.nn.Module", samples: Samples | None, data: GateData,
             config: PruneStageConfig, accuracy: dict[str, Any],
             hardest: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """Distil the pruned model towards the original; (the recovery report or None, warnings)."""
    distill_config = config.distill
    if not distill_config.enabled or samples is None:
        why = "--recover-steps 0" if not distill_config.enabled else "no --calib or --train-data to learn from"
        return None, [f"the pruned model was NOT recovered ({why}): expect a large accuracy drop"]
    names = [s.name for s in config.inputs]
    teacher = run_reference(original, samples, list(data.held_out.reference))
    budget = config.max_accuracy_drop
    recovery = distill_pass.distill(pruned, samples, teacher, names, config.task, distill_config, config.model_kind,
                                    selection_judge(data, budget, distill_config.temperature), budget,
                                    watch=held_out_watch(data, budget), hardest=hardest)
    recovery["selection"] = {"data": data.selection.name, "samples": len(data.selection)}
    recovered = evaluate_module(pruned, data, budget)
    accuracy["recovered"] = recovered["accuracy"]
    recovery["gate"] = recovered["gate"]
    warnings = [w for w in [recovery_curve.too_little_data(len(samples))] if w]
    if not recovered["gate"]["passed"]:
        lever = recovery["advice"] or ("it met the budget on the selection split, so the gap may be the held-out "
                                       "data's noise; more held-out data would tell")
        warnings.append(f"after recovery the pruned model is still short of the original: "
                        f"{recovered['gate']['message']}; {lever}")
    return recovery, warnings


def selection_judge(data: GateData, budget: float | None,
                    temperature: float = 2.0) -> Callable[["torch.nn.Module"], recovery_curve.Check]:
    """The student judged against the original on the selection split (a recovery step's check)."""
    split, first, names = data.selection, data.output, list(data.held_out.reference)

    def check(student: "torch.nn.Module") -> recovery_curve.Check:
        got = run_reference(student, split.samples, names)[first]
        result, verdict = judge(data.task, split.reference[first], got, split.samples.labels, budget)
        distance = distill_pass.teacher_distance(data.task, got, split.reference[first], temperature)
        shown = {k: v for k, v in result.items() if k in ("top1_agreement_pct", "accuracy_pct", "mean_cosine",
                                                          "mean_abs_error")}
        return recovery_curve.Check(0, 0.0, verdict.drop, verdict.interval, verdict.passed, distance, shown, 0.0,
                                  samples=len(split))
    return check


# The held-out drop in the recovery curve is measured on at most this many of the gate's samples.
WATCHED_SAMPLES = 512


def held_out_watch(data: GateData, budget: float | None) -> Callable[["torch.nn.Module"], dict[str, Any]]:
    """The student's drop on the gate's held-out data at a recovery check: recorded for the curve,
    never used to choose (that would spend the gate's data)."""
    split, first, names = data.held_out, data.output, list(data.held_out.reference)
    count = min(len(split), WATCHED_SAMPLES)
    index = np.sort(np.random.default_rng(0).choice(len(split), count, replace=False))  # data may be in class order
    samples, reference = split.samples.take(index), split.reference[first][index]

    def watch(student: "torch.nn.Module") -> dict[str, Any]:
        got = run_reference(student, samples, names)[first]
        _, verdict = judge(data.task, reference, got, samples.labels, budget)
        return {"drop": verdict.drop, "interval": list(verdict.interval) if verdict.interval else None,
                "samples": count}
    return watch


def hardest_layers(module: "torch.nn.Module", layers: list[dict[str, Any]]) -> list[str]:
    """The convolutions and linear layers pruning took the largest share of weights from (most
    compute removed first among equals): the candidates for ``--prune-ignore``."""
    from torch import nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    weighted = {n for n, m in module.named_modules() if isinstance(m, kinds)}
    lost = [(1 - e["params_after"] / e["params_before"], e["macs_before"] - e["macs_after"], e["name"])
            for e in layers if e["name"] in weighted and e["params_before"] and e["params_after"] < e["params_before"]]
    return [name for *_, name in sorted(lost, reverse=True)]


def _prune_and_recover(folder: Path, original: "torch.nn.Module", samples: Samples | None, data: GateData,
                       config: PruneStageConfig) -> dict[str, Any]:
    """The stage's work: prune a copy, measure it, recover it, save ``pruned.pt``; the report."""
    prune = config.prune
    names = [s.name for s in config.inputs]
    example = _tensors(data.held_out.samples, names, slice(0, 2))
    grad_batches, loss = None, None
    task_loss = distill_pass.task_loss(config.task)
    if prune.importance == "taylor" and task_loss is not None:
        grad_batches, loss = _taylor_batches(samples, config, data, task_loss)
    log.info(f"pruning {prune.ratio:.0%} of the {'heads' if config.model_kind == 'transformer' else 'channels'} "
             f"({prune.scope}, {prune.importance} importance)")
    outcome = prune_pass.prune_module(original, example, prune, grad_batches, loss)
    log.info(f"pruned: {prune_pass.ratio_text(outcome.report)}")
    for note in outcome.report.get("notes", []):
        log.info(f"note: {note}")
    accuracy = {"original": evaluate_module(original, data, None)["accuracy"],
                "pruned": evaluate_module(outcome.module, data, None)["accuracy"]}
    recovery, warnings = _recover(original, outcome.module, samples, data, config, accuracy,
                                  hardest_layers(original, outcome.report["layers"]))
    pruned_checkpoint.save_pruned(original, outcome.module, folder / PRUNED_FILE)
    return {**outcome.report, "model_kind": config.model_kind, "recovered": recovery is not None,
            "recovery": recovery, "recovery_data": None if samples is None else {"samples": len(samples),
                                                                                "source": samples.source},
            "accuracy": accuracy, "warnings": warnings}


@dataclasses.dataclass
class PruneResult:
    """What the prune stage returns: the pruned (and recovered) module, rebuilt from the cached
    ``pruned.pt``; the stage's cache folder; its report for the manifest."""

    module: "torch.nn.Module"
    folder: Path
    report: dict[str, Any]


def run_prune_stage(config: PruneStageConfig, loaded: LoadedModel, data: GateData, recovery: Samples | None,
                    model_hash: str, cache: StageCache) -> PruneResult:
    """Prune ``loaded``'s module, recover it on ``recovery`` samples, measure each step on ``data``.
    ``model_hash`` is the source model's identity (checkpoint and architecture)."""
    import torch

    config.prune.check()
    if loaded.format in ("torchscript", "exported-program"):
        raise PruneError(f"--prune needs an eager PyTorch model (a state_dict with --arch, or a pickled "
                         f"module); {loaded.path} is a {loaded.format} graph, which torch-pruning cannot edit")
    original = loaded.module
    hashes = {"model": model_hash, "data": recovery.sha256 if recovery is not None else None,
              "held_out": data.held_out.samples.sha256}
    folder, result = cache.run(PRUNE_STAGE, hashes, config,
                               lambda folder: _prune_and_recover(folder, original, recovery, data, config))
    saved = torch.load(folder / PRUNED_FILE, map_location="cpu", weights_only=True)
    module = pruned_checkpoint.rebuild_pruned(pruned_checkpoint.fresh_copy(original), saved["state_dict"],
                                              saved["pruned_architecture"])
    for line in _accuracy_lines(config.task, result["accuracy"]):
        log.info(line)
    if result.get("recovery"):
        for line in curve_lines(result["recovery"]):
            log.info(line)
    for warning in result["warnings"]:
        log.warning(warning)
    return PruneResult(module, folder, result)


def curve_lines(recovery: dict[str, Any]) -> list[str]:
    """The recovery curve in a few console lines: step -> drop on the selection split (and on the
    held-out data, watched only), what it was judged by, and why it stopped."""
    curve = recovery["curve"]
    shown = curve if len(curve) <= 8 else [*curve[:3], *curve[-5:]]
    points = []
    for check in shown:
        extra = "".join(f", {k.replace('_pct', '')} {v:.4g}" for k, v in check["metrics"].items()
                        if k in ("top1_agreement_pct", "accuracy_pct"))
        drop = "-" if check["drop"] is None else f"{check['drop']:.3g}"
        held = (check.get("held_out") or {}).get("drop")
        held = "" if held is None else f" (held-out {held:.3g})"
        points.append(f"{check['step']}: drop {drop}{held}{extra}")
    lines = [f"  recovery on the {recovery['selection']['data']} ({recovery['selection']['samples']} samples), "
             f"step -> drop: " + "; ".join(points)]
    if recovery.get("signal"):
        lines.append(f"  recovery judged by {recovery['signal']}")
    lines.append(f"  recovery {recovery['stopped']} after {recovery['steps']} steps ({recovery['epochs']:g} epochs "
                 f"over {recovery['samples']} samples, {recovery['seconds']:g} s of {recovery['time_limit_s']:g} s); "
                 f"kept step {recovery['best_step']}")
    if recovery.get("advice"):
        lines.append(f"  recovery stopped short: {recovery['advice']}")
    return lines


def _accuracy_lines(task: str, accuracy: dict[str, Any]) -> list[str]:
    lines = []
    for step in ("original", "pruned", "recovered"):
        if step not in accuracy:
            continue
        measured = accuracy[step].get("eval", accuracy[step]["held_out"])
        shown = ", ".join(f"{k} {v:.4g}" for k, v in measured.items() if k != "max_abs_error")
        lines.append(f"  {step:>9} (torch): {shown or measured}")
    return lines
